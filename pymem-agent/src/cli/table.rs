//! Byte sizes for people, and the sites table of `pymem sites`.
use std::fmt::Write as _;

use super::snapshot::SiteSnapshot;
use crate::sites::location;

const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];

/// `512 B`, `1.5 KiB`, `120.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// tracemalloc's `_format_size`: three significant digits below 100 of a
/// unit (`12.5 MiB`), else four or five digits (`9876 KiB`), with an
/// explicit sign for differences. Kept identical so that pymem's diff reads
/// like `Snapshot.compare_to()`.
pub fn tracemalloc_size(size: f64, signed: bool) -> String {
    let mut size = size;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if size.abs() < 100.0 && unit != "B" {
            return if signed {
                format!("{size:+.1} {unit}")
            } else {
                format!("{size:.1} {unit}")
            };
        }
        if size.abs() < 10.0 * 1024.0 || unit == "TiB" {
            return if signed {
                format!("{size:+.0} {unit}")
            } else {
                format!("{size:.0} {unit}")
            };
        }
        size /= 1024.0;
    }
    unreachable!("TiB always returns")
}

/// The sites table: live and allocated bytes, function, `file:line`.
/// `limit` 0 shows every site.
pub fn sites_table(snapshot: &SiteSnapshot, limit: usize) -> String {
    let shown = shown(snapshot.sites.len(), limit);
    let sites = &snapshot.sites[..shown];
    let mut out = format!(
        "{}: {} allocation sites, {} live\n",
        snapshot.describe(),
        snapshot.sites.len(),
        human_bytes(snapshot.live_bytes())
    );
    if sites.is_empty() {
        out.push_str("no allocation sites yet: stacks are captured when the heap grows\n");
        return out;
    }
    let width = sites
        .iter()
        .map(|s| s.function.len())
        .max()
        .unwrap_or(0)
        .max("FUNCTION".len());
    let _ = writeln!(
        out,
        "{:>10}  {:>10}  {:<width$}  LOCATION",
        "LIVE", "ALLOCATED", "FUNCTION"
    );
    for site in sites {
        let _ = writeln!(
            out,
            "{:>10}  {:>10}  {:<width$}  {}",
            human_bytes(site.bytes),
            human_bytes(site.allocated_bytes),
            site.function,
            location(&site.file, site.line)
        );
    }
    let hidden = snapshot.sites.len() - shown;
    if hidden > 0 {
        let _ = writeln!(out, "({hidden} more sites; --limit 0 shows all)");
    }
    out
}

/// How many of `total` rows a `--limit` shows (0 = all).
pub fn shown(total: usize, limit: usize) -> usize {
    if limit == 0 { total } else { total.min(limit) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_use_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(120 << 20), "120.0 MiB");
    }

    #[test]
    fn sizes_format_like_tracemalloc() {
        // Values checked against CPython's tracemalloc._format_size.
        assert_eq!(tracemalloc_size(0.0, false), "0 B");
        assert_eq!(tracemalloc_size(0.0, true), "+0 B");
        assert_eq!(tracemalloc_size(10239.0, false), "10239 B");
        assert_eq!(tracemalloc_size(10240.0, false), "10.0 KiB");
        assert_eq!(tracemalloc_size(-2_500_000.0, true), "-2441 KiB");
        assert_eq!(tracemalloc_size(15_000_000.0, true), "+14.3 MiB");
    }
}
