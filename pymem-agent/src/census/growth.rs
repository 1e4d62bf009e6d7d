//! Growth per type between two censuses, as objgraph's `show_growth()`.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::HeapCensus;

/// One type's change between two censuses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeGrowth {
    #[serde(rename = "type")]
    pub type_name: String,
    /// In the newer census (0 for a type that vanished).
    pub count: u64,
    pub bytes: u64,
    pub count_delta: i64,
    pub bytes_delta: i64,
}

/// Every type whose count or bytes changed from `old` (none: an empty
/// heap, as objgraph's first call) to `new`: biggest count growth first,
/// then biggest byte growth; types that vanished count negative.
pub fn growth(old: Option<&HeapCensus>, new: &HeapCensus) -> Vec<TypeGrowth> {
    let before: HashMap<&str, (u64, u64)> = old
        .map(|old| {
            old.types
                .iter()
                .map(|t| (t.type_name.as_str(), (t.count, t.bytes)))
                .collect()
        })
        .unwrap_or_default();
    let mut rows: Vec<TypeGrowth> = new
        .types
        .iter()
        .map(|t| {
            let (count, bytes) = before.get(t.type_name.as_str()).copied().unwrap_or((0, 0));
            TypeGrowth {
                type_name: t.type_name.clone(),
                count: t.count,
                bytes: t.bytes,
                count_delta: delta(t.count, count),
                bytes_delta: delta(t.bytes, bytes),
            }
        })
        .collect();
    let present: std::collections::HashSet<&str> =
        new.types.iter().map(|t| t.type_name.as_str()).collect();
    for (name, &(count, bytes)) in &before {
        if !present.contains(name) {
            rows.push(TypeGrowth {
                type_name: (*name).to_string(),
                count: 0,
                bytes: 0,
                count_delta: delta(0, count),
                bytes_delta: delta(0, bytes),
            });
        }
    }
    rows.retain(|r| r.count_delta != 0 || r.bytes_delta != 0);
    rows.sort_by(|a, b| {
        b.count_delta
            .cmp(&a.count_delta)
            .then(b.bytes_delta.cmp(&a.bytes_delta))
            .then_with(|| a.type_name.cmp(&b.type_name))
    });
    rows
}

fn delta(new: u64, old: u64) -> i64 {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    clamp(new).saturating_sub(clamp(old))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::TypeStats;

    fn heap(types: &[(&str, u64, u64)]) -> HeapCensus {
        HeapCensus {
            types: types
                .iter()
                .map(|&(name, count, bytes)| TypeStats {
                    type_name: name.into(),
                    count,
                    bytes,
                })
                .collect(),
            ..HeapCensus::default()
        }
    }

    #[test]
    fn biggest_count_growth_first_and_vanished_types_negative() {
        let old = heap(&[
            ("dict", 100, 10_000),
            ("str", 50, 2_500),
            ("gone.Cls", 7, 392),
        ]);
        let new = heap(&[
            ("dict", 120, 12_000),
            ("str", 50, 2_500),
            ("app.Leak", 900, 50_400),
        ]);
        let rows = growth(Some(&old), &new);
        let summary: Vec<(&str, i64, i64)> = rows
            .iter()
            .map(|r| (r.type_name.as_str(), r.count_delta, r.bytes_delta))
            .collect();
        assert_eq!(
            summary,
            [
                ("app.Leak", 900, 50_400),
                ("dict", 20, 2_000),
                ("gone.Cls", -7, -392)
            ],
            "unchanged str left out"
        );
        assert_eq!(rows[2].count, 0);
    }

    #[test]
    fn without_a_previous_census_everything_is_growth() {
        let new = heap(&[("dict", 3, 300)]);
        let rows = growth(None, &new);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].count_delta, rows[0].bytes_delta), (3, 300));
    }
}
