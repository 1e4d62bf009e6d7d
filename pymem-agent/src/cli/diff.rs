//! `pymem diff`: what changed between two site snapshots, per Python line,
//! in the manner of tracemalloc's `Snapshot.compare_to(old, 'lineno')`;
//! with the snapshots' censuses, per type and per holder too.
use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
};

use serde::Serialize;

use super::{
    snapshot::SiteSnapshot,
    table::shown,
    types::{growth_table, signed_bytes},
};
use crate::{
    census::{TypeGrowth, growth},
    format::{self, tracemalloc_size},
    holders::{self, HolderGrowth},
    sites::{Site, location},
    top::text::truncate,
};

/// One site in both snapshots (zero where it is absent).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct SiteDiff {
    pub function: String,
    pub file: String,
    pub line: i64,
    /// Live bytes in the newer snapshot.
    pub size: u64,
    /// Live bytes, newer minus older.
    pub size_diff: i64,
    pub allocated: u64,
    pub allocated_diff: i64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct SnapshotDiff {
    pub pid: u32,
    pub comm: String,
    pub python_version: String,
    /// Time from the older to the newer snapshot.
    pub seconds: f64,
    pub heap_bytes: u64,
    pub heap_bytes_diff: i64,
    /// Live bytes over all sites.
    pub size: u64,
    pub size_diff: i64,
    /// Largest |size_diff| first.
    pub sites: Vec<SiteDiff>,
    /// Growth per type between the snapshots' censuses (biggest count
    /// growth first); empty unless both have one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<TypeGrowth>,
    /// Growth per holder (root) between the censuses, biggest retained
    /// growth first; empty unless both have a census.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<HolderGrowth>,
}

type SiteKey<'a> = (&'a str, &'a str, i64);

fn key(site: &Site) -> SiteKey<'_> {
    (&site.function, &site.file, site.line)
}

/// Compares `new` against `old`, site by site.
pub fn compare(old: &SiteSnapshot, new: &SiteSnapshot) -> SnapshotDiff {
    let old_sites: HashMap<SiteKey, &Site> = old.sites.iter().map(|s| (key(s), s)).collect();
    let mut sites: Vec<SiteDiff> = new
        .sites
        .iter()
        .map(|site| site_diff(site, old_sites.get(&key(site)).copied()))
        .collect();
    let new_keys: HashSet<SiteKey> = new.sites.iter().map(key).collect();
    sites.extend(
        old.sites
            .iter()
            .filter(|s| !new_keys.contains(&key(s)))
            .map(gone_site),
    );
    // compare_to's order: biggest change, then biggest size, then location.
    sites.sort_by(|a, b| {
        b.size_diff
            .unsigned_abs()
            .cmp(&a.size_diff.unsigned_abs())
            .then(b.size.cmp(&a.size))
            .then_with(|| (&a.file, a.line, &a.function).cmp(&(&b.file, b.line, &b.function)))
    });
    SnapshotDiff {
        pid: new.pid,
        comm: new.comm.clone(),
        python_version: new.python_version.clone(),
        seconds: new.taken_at - old.taken_at,
        heap_bytes: new.heap_bytes,
        heap_bytes_diff: difference(new.heap_bytes, old.heap_bytes),
        size: new.live_bytes(),
        size_diff: difference(new.live_bytes(), old.live_bytes()),
        sites,
        types: match (&old.census, &new.census) {
            (Some(old), Some(new)) => growth(Some(&old.heap), &new.heap),
            _ => Vec::new(),
        },
        holders: match (&old.census, &new.census) {
            (Some(old), Some(new)) => holders::growth(&old.heap.holders, &new.heap.holders),
            _ => Vec::new(),
        },
    }
}

fn site_diff(new: &Site, old: Option<&Site>) -> SiteDiff {
    let (old_live, old_allocated) = old.map_or((0, 0), |o| (o.bytes, o.allocated_bytes));
    SiteDiff {
        function: new.function.clone(),
        file: new.file.clone(),
        line: new.line,
        size: new.bytes,
        size_diff: difference(new.bytes, old_live),
        allocated: new.allocated_bytes,
        allocated_diff: difference(new.allocated_bytes, old_allocated),
    }
}

/// A site only the older snapshot has: everything it held is gone.
fn gone_site(old: &Site) -> SiteDiff {
    SiteDiff {
        function: old.function.clone(),
        file: old.file.clone(),
        line: old.line,
        size: 0,
        size_diff: difference(0, old.bytes),
        allocated: 0,
        allocated_diff: difference(0, old.allocated_bytes),
    }
}

fn difference(new: u64, old: u64) -> i64 {
    (i128::from(new) - i128::from(old)).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// tracemalloc's StatisticDiff lines (`file:line: size=... (+...)`), with
/// pymem's allocated bytes and function, then the totals.
pub fn render_text(diff: &SnapshotDiff, limit: usize) -> String {
    let count = shown(diff.sites.len(), limit);
    let mut out = format!(
        "Top {count} differences, pid {} ({}, Python {}), {:.1} s apart:\n",
        diff.pid, diff.comm, diff.python_version, diff.seconds
    );
    for site in &diff.sites[..count] {
        let _ = writeln!(
            out,
            "{}: size={} ({}), allocated={} ({}), function={}",
            location(&site.file, site.line),
            tracemalloc_size(site.size as f64, false),
            tracemalloc_size(site.size_diff as f64, true),
            tracemalloc_size(site.allocated as f64, false),
            tracemalloc_size(site.allocated_diff as f64, true),
            site.function
        );
    }
    let _ = writeln!(
        out,
        "Total: size={} ({}) over {} sites; heap={} ({})",
        tracemalloc_size(diff.size as f64, false),
        tracemalloc_size(diff.size_diff as f64, true),
        diff.sites.len(),
        tracemalloc_size(diff.heap_bytes as f64, false),
        tracemalloc_size(diff.heap_bytes_diff as f64, true)
    );
    if !diff.types.is_empty() {
        out.push_str("\nType growth between the censuses:\n");
        out.push_str(&growth_table(&diff.types, limit));
    }
    if !diff.holders.is_empty() {
        out.push_str("\nHolder growth between the censuses:\n");
        out.push_str(&holder_growth_table(&diff.holders, limit));
    }
    out
}

/// Widest holder name before it is cut (with `…`).
const HOLDER_WIDTH: usize = 60;

/// RETAINED before -> after, +RETAINED, LENGTH before -> after, NAME
/// (TYPE): biggest retained growth first; `new` and `gone` roots marked.
pub fn holder_growth_table(rows: &[HolderGrowth], limit: usize) -> String {
    let shown = shown(rows.len(), limit);
    let mut out = format!(
        "{:>10}  {:>10}  {:>11}  {:>8}  {:>8}  {:>9}  HOLDER\n",
        "BEFORE", "RETAINED", "+RETAINED", "LEN WAS", "LENGTH", "+LENGTH"
    );
    let length = |l: Option<u64>| l.map_or_else(|| "-".to_string(), |l| l.to_string());
    for g in &rows[..shown] {
        let mark = match (g.new, g.vanished) {
            (true, _) => " (new)",
            (_, true) => " (gone)",
            _ => "",
        };
        let _ = writeln!(
            out,
            "{:>10}  {:>10}  {:>11}  {:>8}  {:>8}  {:>9}  {} ({}){mark}",
            format::bytes(g.retained_before),
            format::bytes(g.retained_bytes),
            signed_bytes(g.retained_delta),
            length(g.length_before),
            length(g.length),
            g.length_delta
                .map_or_else(String::new, |d| format!("{d:+}")),
            truncate(&g.name, HOLDER_WIDTH),
            g.type_name,
        );
    }
    if rows.len() > shown {
        let _ = writeln!(
            out,
            "({} more holders; --limit 0 shows all)",
            rows.len() - shown
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::{Census, HeapCensus, TypeStats};

    fn site(function: &str, line: i64, bytes: u64, allocated_bytes: u64) -> Site {
        Site {
            function: function.into(),
            file: "app.py".into(),
            line,
            bytes,
            allocated_bytes,
            ..Default::default()
        }
    }

    fn snapshot(taken_at: f64, heap_bytes: u64, sites: Vec<Site>) -> SiteSnapshot {
        SiteSnapshot {
            pid: 7,
            comm: "python3".into(),
            python_version: "3.11.7".into(),
            taken_at,
            heap_bytes,
            sites,
            attribution: None,
            attribution_note: None,
            census: None,
            census_error: None,
        }
    }

    #[test]
    fn sites_are_matched_by_line_and_sorted_by_absolute_change() {
        let old = snapshot(
            100.0,
            1000,
            vec![
                site("leak", 9, 100, 100),
                site("freed", 4, 600, 600),
                site("steady", 2, 50, 50),
            ],
        );
        let new = snapshot(
            105.0,
            1500,
            vec![
                site("leak", 9, 900, 900),
                site("steady", 2, 50, 70),
                site("new", 12, 10, 10),
            ],
        );
        let diff = compare(&old, &new);
        let order: Vec<(&str, i64)> = diff
            .sites
            .iter()
            .map(|s| (s.function.as_str(), s.size_diff))
            .collect();
        assert_eq!(
            order,
            [("leak", 800), ("freed", -600), ("new", 10), ("steady", 0)]
        );
        assert_eq!(diff.sites[3].allocated_diff, 20);
        assert_eq!((diff.size, diff.size_diff), (960, 210));
        assert_eq!((diff.heap_bytes_diff, diff.seconds), (500, 5.0));
    }

    #[test]
    fn type_growth_shows_beside_site_growth_when_both_have_a_census() {
        let census = |count: u64| Census {
            pid: 7,
            taken_at: 0.0,
            consistency: "paused".into(),
            pause_seconds: 0.0,
            copy_seconds: 0.0,
            parse_seconds: 0.0,
            cpu_seconds: 0.0,
            copied_bytes: 0,
            heap: HeapCensus {
                types: vec![TypeStats {
                    type_name: "app.Leak".into(),
                    count,
                    bytes: count * 56,
                }],
                ..HeapCensus::default()
            },
        };
        let mut old = snapshot(0.0, 0, vec![site("leak", 9, 1 << 20, 1 << 20)]);
        let mut new = snapshot(5.0, 0, vec![site("leak", 9, 3 << 20, 3 << 20)]);
        assert!(compare(&old, &new).types.is_empty());
        old.census = Some(census(1000));
        new.census = Some(census(51_000));
        let diff = compare(&old, &new);
        assert_eq!(diff.types[0].count_delta, 50_000);
        let text = render_text(&diff, 10);
        assert!(
            text.contains("Type growth between the censuses:\n"),
            "{text}"
        );
        assert!(
            text.contains("       51000      +50000     2.7 MiB     +2.7 MiB  app.Leak\n"),
            "{text}"
        );
    }

    #[test]
    fn holder_growth_shows_beside_type_growth_new_and_gone_roots_marked() {
        use crate::holders::{
            HeapHolders,
            tests::{census_with, holder},
        };
        let census = |roots: Vec<crate::holders::Holder>| {
            census_with(HeapHolders {
                holders: roots,
                ..HeapHolders::default()
            })
        };
        let mut old = snapshot(0.0, 0, vec![]);
        let mut new = snapshot(5.0, 0, vec![]);
        old.census = Some(census(vec![
            holder("__main__.ORDERS", "list", Some(1000), 1 << 20, vec![]),
            holder("__main__.OLD", "dict", Some(10), 4096, vec![]),
        ]));
        new.census = Some(census(vec![
            holder("__main__.ORDERS", "list", Some(201_000), 33 << 20, vec![]),
            holder("__main__.TOKENS", "dict", Some(100_000), 20 << 20, vec![]),
        ]));
        let diff = compare(&old, &new);
        let names: Vec<(&str, i64)> = diff
            .holders
            .iter()
            .map(|h| (h.name.as_str(), h.retained_delta))
            .collect();
        assert_eq!(
            names,
            [
                ("__main__.ORDERS", 32 << 20),
                ("__main__.TOKENS", 20 << 20),
                ("__main__.OLD", -4096)
            ]
        );
        let text = render_text(&diff, 10);
        let table = text
            .split_once("Holder growth between the censuses:\n")
            .unwrap_or_else(|| panic!("{text}"))
            .1;
        assert_eq!(
            table,
            concat!(
                "    BEFORE    RETAINED    +RETAINED   LEN WAS    LENGTH    +LENGTH  HOLDER\n",
                "   1.0 MiB    33.0 MiB    +32.0 MiB      1000    201000    +200000  __main__.ORDERS (list)\n",
                "       0 B    20.0 MiB    +20.0 MiB         -    100000             __main__.TOKENS (dict) (new)\n",
                "   4.0 KiB         0 B     -4.0 KiB        10         -             __main__.OLD (dict) (gone)\n",
            ),
            "\n{text}"
        );
        let json = serde_json::to_value(&diff).unwrap();
        assert_eq!(json["holders"][1]["new"], true);
        assert_eq!(json["holders"][2]["vanished"], true);
        assert_eq!(json["holders"][0]["length_delta"], 200_000);
    }

    #[test]
    fn text_reads_like_tracemalloc() {
        let old = snapshot(0.0, 0, vec![site("leak", 9, 1 << 20, 1 << 20)]);
        let new = snapshot(5.0, 0, vec![site("leak", 9, 3 << 20, 3 << 20)]);
        let text = render_text(&compare(&old, &new), 10);
        assert!(
            text.contains(
                "app.py:9: size=3072 KiB (+2048 KiB), allocated=3072 KiB (+2048 KiB), function=leak\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("Total: size=3072 KiB (+2048 KiB) over 1 sites"),
            "{text}"
        );
    }
}
