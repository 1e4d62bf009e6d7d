//! The sites table of `pymem sites`.
use std::fmt::Write as _;

use super::snapshot::SiteSnapshot;
use crate::{
    format,
    sites::{location, state::Attribution},
};

/// The sites table: live and allocated bytes, function, `file:line`, and
/// for sites attributed by heap state the holder each line fills. `limit`
/// 0 shows every site.
pub fn sites_table(snapshot: &SiteSnapshot, limit: usize) -> String {
    let shown = shown(snapshot.sites.len(), limit);
    let sites = &snapshot.sites[..shown];
    let by_state = snapshot.attribution == Some(Attribution::HeapState);
    let mut out = format!(
        "{}: {} sites, {} live",
        snapshot.describe(),
        snapshot.sites.len(),
        format::bytes(snapshot.live_bytes())
    );
    match (snapshot.attribution, &snapshot.attribution_note) {
        (Some(Attribution::HeapState), _) => {
            out.push_str(", by heap state: the lines that fill what holds the memory\n")
        }
        (Some(Attribution::AllocationSamples), Some(note)) => {
            let _ = writeln!(out, ", from allocation samples ({note})");
        }
        _ => out.push_str(", from allocation samples\n"),
    }
    if sites.is_empty() {
        out.push_str(if by_state {
            "no holders found\n"
        } else {
            "no allocation sites yet: stacks are captured when the heap grows\n"
        });
        return out;
    }
    let functions: Vec<String> = sites
        .iter()
        .map(|s| {
            if s.import_time {
                format!("{} (import)", s.function)
            } else {
                s.function.clone()
            }
        })
        .collect();
    let width = functions
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .max("FUNCTION".len());
    if by_state {
        let locations: Vec<String> = sites.iter().map(|s| location(&s.file, s.line)).collect();
        let location_width = locations
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max("LOCATION".len());
        let _ = writeln!(
            out,
            "{:>10}  {:<width$}  {:<location_width$}  FILLS",
            "LIVE", "FUNCTION", "LOCATION"
        );
        for ((site, location), function) in sites.iter().zip(&locations).zip(&functions) {
            let fills = match (&site.holder, &site.store) {
                (Some(holder), Some(store)) => format!("{holder} ({store})"),
                (Some(holder), None) => holder.clone(),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{:>10}  {function:<width$}  {location:<location_width$}  {fills}",
                format::bytes(site.bytes),
            );
        }
    } else {
        let _ = writeln!(
            out,
            "{:>10}  {:>10}  {:<width$}  LOCATION",
            "LIVE", "ALLOCATED", "FUNCTION"
        );
        for (site, function) in sites.iter().zip(&functions) {
            let _ = writeln!(
                out,
                "{:>10}  {:>10}  {function:<width$}  {}",
                format::bytes(site.bytes),
                format::bytes(site.allocated_bytes),
                location(&site.file, site.line)
            );
        }
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
