//! The sites table of `pymem sites`.
use std::fmt::Write as _;

use super::snapshot::SiteSnapshot;
use crate::{format, sites::location};

/// The sites table: live and allocated bytes, function, `file:line`.
/// `limit` 0 shows every site.
pub fn sites_table(snapshot: &SiteSnapshot, limit: usize) -> String {
    let shown = shown(snapshot.sites.len(), limit);
    let sites = &snapshot.sites[..shown];
    let mut out = format!(
        "{}: {} allocation sites, {} live\n",
        snapshot.describe(),
        snapshot.sites.len(),
        format::bytes(snapshot.live_bytes())
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
            format::bytes(site.bytes),
            format::bytes(site.allocated_bytes),
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
