//! What holds a process's memory, as the API, the commands, `pymem top` and
//! the snapshots show it: the census's holders (roots by retained size)
//! cut to a number of roots and a depth of children, and their growth
//! between two censuses.
//!
//! Holders carry names (of globals, attributes, locals, types), lengths and
//! sizes only, never values: nothing here prints or stores a value.
use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::census::Census;
pub use crate::cpython::heap::{HeapHolders, Holder};

/// Roots a snapshot keeps of its census's holders.
pub const SNAPSHOT_HOLDERS: usize = 50;
/// Levels of children a snapshot keeps under each root.
pub const SNAPSHOT_DEPTH: usize = 2;

/// The holders of one census as `/api/v1/processes/{pid}/holders?report=1`
/// serves them: which census, the roots (cut), and the census's totals and
/// warnings about them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldersReport {
    pub pid: u32,
    /// Unix time in seconds (fractional) of the census.
    pub taken_at: f64,
    /// As the census's: `paused`, or `may be torn: <reason>`.
    pub consistency: String,
    /// The census's objects and their bytes.
    pub objects: u64,
    pub object_bytes: u64,
    /// Roots the census found, before `limit` cut them.
    pub roots: usize,
    /// `holders` (heaviest retained first), `reachable_bytes`,
    /// `unreachable_bytes`, `opaque_types`, `warnings`.
    #[serde(flatten)]
    pub holders: HeapHolders,
}

impl HoldersReport {
    /// The holders of `census`: the first `limit` roots (0: all), with
    /// `depth` levels of children (None: all of them).
    pub fn new(census: &Census, limit: usize, depth: Option<usize>) -> Self {
        let all = &census.heap.holders;
        Self {
            pid: census.pid,
            taken_at: census.taken_at,
            consistency: census.consistency.clone(),
            objects: census.heap.objects,
            object_bytes: census.heap.object_bytes,
            roots: all.holders.len(),
            holders: HeapHolders {
                holders: cut(&all.holders, limit, depth),
                reachable_bytes: all.reachable_bytes,
                unreachable_bytes: all.unreachable_bytes,
                opaque_types: all.opaque_types.clone(),
                warnings: all.warnings.clone(),
            },
        }
    }
}

/// Copies of the first `limit` of `roots` (0: all), trimmed to `depth`.
pub fn cut(roots: &[Holder], limit: usize, depth: Option<usize>) -> Vec<Holder> {
    let shown = if limit == 0 {
        roots.len()
    } else {
        roots.len().min(limit)
    };
    let mut roots = roots[..shown].to_vec();
    if let Some(depth) = depth {
        trim_depth(&mut roots, depth);
    }
    roots
}

/// Keeps `depth` levels of children under each of `holders` (0: none) and
/// drops the deeper ones.
pub fn trim_depth(holders: &mut [Holder], depth: usize) {
    for holder in holders {
        if depth == 0 {
            holder.children = Vec::new();
        } else {
            trim_depth(&mut holder.children, depth - 1);
        }
    }
}

/// In place: the first `limit` roots of `holders` (0: all), trimmed to
/// `depth` levels of children; the totals stay.
pub fn keep(holders: &mut HeapHolders, limit: usize, depth: usize) {
    if limit > 0 {
        holders.holders.truncate(limit);
    }
    trim_depth(&mut holders.holders, depth);
}

/// One root's change between two censuses, matched by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderGrowth {
    pub name: String,
    /// Its type in the newer census (in the older for a vanished root).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Retained bytes in the newer census (0 for a vanished root).
    pub retained_bytes: u64,
    /// Retained bytes in the older census (0 for a new root).
    pub retained_before: u64,
    pub retained_delta: i64,
    #[serde(default)]
    pub length: Option<u64>,
    #[serde(default)]
    pub length_before: Option<u64>,
    /// When both censuses know its length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_delta: Option<i64>,
    /// Only in the newer census.
    #[serde(default, skip_serializing_if = "is_false")]
    pub new: bool,
    /// Only in the older census.
    #[serde(default, skip_serializing_if = "is_false")]
    pub vanished: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Every root whose retained bytes or length changed from `old` to `new`,
/// matched by name (the heavier of two roots of one name counts): biggest
/// retained growth first, roots that vanished counting negative.
pub fn growth(old: &HeapHolders, new: &HeapHolders) -> Vec<HolderGrowth> {
    let mut before: HashMap<&str, &Holder> = HashMap::new();
    for holder in &old.holders {
        before.entry(holder.name.as_str()).or_insert(holder);
    }
    let mut seen: HashSet<&str> = HashSet::new();
    let mut rows = Vec::new();
    for holder in &new.holders {
        if !seen.insert(holder.name.as_str()) {
            continue;
        }
        let old = before.get(holder.name.as_str()).copied();
        rows.push(HolderGrowth {
            name: holder.name.clone(),
            type_name: holder.type_name.clone(),
            retained_bytes: holder.retained_bytes,
            retained_before: old.map_or(0, |o| o.retained_bytes),
            retained_delta: delta(holder.retained_bytes, old.map_or(0, |o| o.retained_bytes)),
            length: holder.length,
            length_before: old.and_then(|o| o.length),
            length_delta: old
                .and_then(|o| o.length)
                .zip(holder.length)
                .map(|(before, after)| delta(after, before)),
            new: old.is_none(),
            vanished: false,
        });
    }
    for holder in &old.holders {
        if seen.insert(holder.name.as_str()) {
            rows.push(HolderGrowth {
                name: holder.name.clone(),
                type_name: holder.type_name.clone(),
                retained_bytes: 0,
                retained_before: holder.retained_bytes,
                retained_delta: delta(0, holder.retained_bytes),
                length: None,
                length_before: holder.length,
                length_delta: None,
                new: false,
                vanished: true,
            });
        }
    }
    rows.retain(|r| r.retained_delta != 0 || r.length_delta.is_some_and(|d| d != 0) || r.new);
    rows.sort_by(|a, b| {
        b.retained_delta
            .cmp(&a.retained_delta)
            .then_with(|| a.name.cmp(&b.name))
    });
    rows
}

fn delta(new: u64, old: u64) -> i64 {
    (i128::from(new) - i128::from(old)).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::census::{HeapCensus, PAUSED};

    pub(crate) fn holder(
        name: &str,
        type_name: &str,
        length: Option<u64>,
        retained_bytes: u64,
        children: Vec<Holder>,
    ) -> Holder {
        Holder {
            name: name.into(),
            type_name: type_name.into(),
            length,
            count: 1,
            retained_bytes,
            deep_bytes: retained_bytes + 1000,
            children,
            writers: Vec::new(),
        }
    }

    /// `__main__.ORDERS` (a list of orders, their dicts below them),
    /// `__main__.TOKENS`, a frame local.
    pub(crate) fn sample_holders() -> HeapHolders {
        let dicts = Holder {
            count: 200_000,
            ..holder(".__dict__", "dict", None, 20 << 20, Vec::new())
        };
        let orders = Holder {
            count: 200_000,
            ..holder("[*]", "app.Order", None, 30 << 20, vec![dicts])
        };
        HeapHolders {
            holders: vec![
                holder(
                    "__main__.ORDERS",
                    "list",
                    Some(200_000),
                    32 << 20,
                    vec![orders],
                ),
                holder("__main__.TOKENS", "dict", Some(100_000), 20 << 20, vec![]),
                holder(
                    "thread 7 / hold_batch / batch",
                    "list",
                    Some(100_000),
                    3_200_000,
                    vec![],
                ),
            ],
            reachable_bytes: 60 << 20,
            unreachable_bytes: 2048,
            opaque_types: vec!["numpy.ndarray".into()],
            warnings: vec!["3 frames unreadable".into()],
        }
    }

    pub(crate) fn census_with(holders: HeapHolders) -> Census {
        Census {
            pid: 42,
            taken_at: 100.0,
            consistency: PAUSED.into(),
            pause_seconds: 0.0,
            copy_seconds: 0.0,
            parse_seconds: 0.0,
            cpu_seconds: 0.0,
            copied_bytes: 0,
            heap: HeapCensus {
                objects: 700_000,
                object_bytes: 61 << 20,
                holders,
                ..HeapCensus::default()
            },
        }
    }

    fn depth_of(holders: &[Holder]) -> usize {
        holders
            .iter()
            .map(|h| 1 + depth_of(&h.children))
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn depth_keeps_that_many_levels_of_children() {
        let roots = sample_holders().holders;
        assert_eq!(depth_of(&roots), 3);
        for (depth, levels) in [(0, 1), (1, 2), (2, 3), (5, 3)] {
            let mut trimmed = roots.clone();
            trim_depth(&mut trimmed, depth);
            assert_eq!(depth_of(&trimmed), levels, "depth {depth}");
        }
        let mut trimmed = roots.clone();
        trim_depth(&mut trimmed, 1);
        assert_eq!(trimmed[0].children[0].name, "[*]");
        assert!(trimmed[0].children[0].children.is_empty());

        // What a snapshot keeps: the first roots, two levels, the totals.
        let mut kept = sample_holders();
        keep(&mut kept, 2, 1);
        assert_eq!(kept.holders.len(), 2);
        assert_eq!(depth_of(&kept.holders), 2);
        assert_eq!(kept.reachable_bytes, sample_holders().reachable_bytes);
    }

    #[test]
    fn a_report_cuts_the_roots_and_keeps_the_totals() {
        let census = census_with(sample_holders());
        let report = HoldersReport::new(&census, 2, Some(0));
        assert_eq!(report.roots, 3);
        let names: Vec<&str> = report
            .holders
            .holders
            .iter()
            .map(|h| h.name.as_str())
            .collect();
        assert_eq!(names, ["__main__.ORDERS", "__main__.TOKENS"]);
        assert!(report.holders.holders[0].children.is_empty());
        assert_eq!(report.holders.unreachable_bytes, 2048);
        assert_eq!(report.holders.opaque_types, ["numpy.ndarray"]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["holders"][0]["type"], "list");
        assert_eq!(json["holders"][0]["length"], 200_000);
        assert_eq!(json["reachable_bytes"], 60u64 << 20);
        assert_eq!(json["pid"], 42);
        let all = HoldersReport::new(&census, 0, None);
        assert_eq!(all.holders, census.heap.holders);
        let empty = HoldersReport::new(&census_with(HeapHolders::default()), 10, Some(2));
        assert_eq!((empty.roots, empty.holders.holders.len()), (0, 0));
    }

    #[test]
    fn growth_matches_roots_by_name_biggest_growth_first() {
        let old = HeapHolders {
            holders: vec![
                holder("__main__.CACHE", "dict", Some(10), 1000, vec![]),
                holder("__main__.GONE", "list", Some(5), 500, vec![]),
                holder("__main__.STEADY", "list", Some(3), 300, vec![]),
            ],
            ..HeapHolders::default()
        };
        let new = HeapHolders {
            holders: vec![
                holder("__main__.CACHE", "dict", Some(1010), 101_000, vec![]),
                holder("__main__.FRESH", "set", Some(2), 400, vec![]),
                holder("__main__.STEADY", "list", Some(3), 300, vec![]),
            ],
            ..HeapHolders::default()
        };
        let rows = growth(&old, &new);
        type Row<'a> = (&'a str, u64, u64, i64, Option<i64>, bool, bool);
        let summary: Vec<Row> = rows
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.retained_before,
                    r.retained_bytes,
                    r.retained_delta,
                    r.length_delta,
                    r.new,
                    r.vanished,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "__main__.CACHE",
                    1000,
                    101_000,
                    100_000,
                    Some(1000),
                    false,
                    false
                ),
                ("__main__.FRESH", 0, 400, 400, None, true, false),
                ("__main__.GONE", 500, 0, -500, None, false, true),
            ],
            "unchanged STEADY left out"
        );
        assert_eq!(rows[0].length_before, Some(10));
        assert_eq!(rows[2].length_before, Some(5));
        assert!(growth(&HeapHolders::default(), &HeapHolders::default()).is_empty());
    }
}
