//! `pymem holders PID`: which variables hold a process's memory (module
//! globals, class attributes, frame locals) by retained size, from an
//! agent or, when none answers, from an embedded observer.
use std::{fmt::Write as _, time::Duration};

use anyhow::Result;

use super::{
    AgentArg, print_json,
    types::{connect, discovered},
};
use crate::{
    format,
    holders::{Holder, HoldersReport},
    top::text::truncate,
};

#[derive(clap::Args)]
pub struct HoldersArgs {
    /// The Python process.
    pid: u32,
    /// Print the holders as JSON (the agent's `/holders?report=1` answer).
    #[arg(long)]
    json: bool,
    /// Show N levels of what each root holds (0: the roots only).
    #[arg(long, value_name = "N", default_value_t = 2)]
    depth: usize,
    /// Show at most N roots, heaviest retained first; 0 shows all.
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: usize,
    #[command(flatten)]
    agent: AgentArg,
}

pub fn run_holders(args: HoldersArgs) -> Result<()> {
    let source = connect(&args.agent)?;
    discovered(&source, args.pid)?;
    let report = source.holders(args.pid, Duration::ZERO, args.limit, Some(args.depth))?;
    if args.json {
        print_json(&report)
    } else {
        print!("{}", render_text(&report, args.depth));
        Ok(())
    }
}

/// Widest name and type columns, beyond which they are cut (with `…`).
const NAME_WIDTH: usize = 60;
const TYPE_WIDTH: usize = 32;
/// Indentation per level of children.
const INDENT: usize = 2;

/// The holders as a table: each root, then what it holds indented below
/// it (`depth` levels), then the totals and what is missing. Names, types,
/// lengths and sizes only.
pub fn render_text(report: &HoldersReport, depth: usize) -> String {
    let holders = &report.holders;
    let mut out = format!(
        "pid {}: {} holders of {} objects, {} ({})\n",
        report.pid,
        report.roots,
        report.objects,
        format::bytes(report.object_bytes),
        report.consistency
    );
    if holders.holders.is_empty() {
        out.push_str("no holders in this census\n");
    } else {
        let mut rows = Vec::new();
        for root in &holders.holders {
            flatten(root, 0, depth, &mut rows);
        }
        let width = |f: &dyn Fn(&(usize, &Holder)) -> usize, header: &str, max: usize| {
            rows.iter()
                .map(f)
                .max()
                .unwrap_or(0)
                .max(header.len())
                .min(max)
        };
        let name_width = width(
            &|(level, h)| level * INDENT + h.name.chars().count(),
            "NAME",
            NAME_WIDTH,
        );
        let type_width = width(&|(_, h)| h.type_name.chars().count(), "TYPE", TYPE_WIDTH);
        let _ = writeln!(
            out,
            "{:<name_width$}  {:<type_width$}  {:>9}  {:>10}  {:>10}",
            "NAME", "TYPE", "LENGTH", "RETAINED", "DEEP"
        );
        for (level, holder) in rows {
            let indent = level * INDENT;
            let name = format!(
                "{:indent$}{}",
                "",
                truncate(&holder.name, name_width.saturating_sub(indent))
            );
            let _ = writeln!(
                out,
                "{name:<name_width$}  {:<type_width$}  {:>9}  {:>10}  {:>10}",
                truncate(&holder.type_name, type_width),
                length(holder, level),
                format::bytes(holder.retained_bytes),
                format::bytes(holder.deep_bytes),
            );
        }
        let hidden = report.roots.saturating_sub(holders.holders.len());
        if hidden > 0 {
            let _ = writeln!(out, "({hidden} more holders; --limit 0 shows all)");
        }
    }
    let _ = writeln!(
        out,
        "reachable from the holders {}, unreachable {}",
        format::bytes(holders.reachable_bytes),
        format::bytes(holders.unreachable_bytes)
    );
    if !holders.opaque_types.is_empty() {
        let _ = writeln!(
            out,
            "not followed (opaque types): {}",
            holders.opaque_types.join(", ")
        );
    }
    for warning in &holders.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}

/// A root's `len()`; a child's object count (`×N`), as a child is a group.
fn length(holder: &Holder, level: usize) -> String {
    match (level, holder.length) {
        (0, Some(length)) => length.to_string(),
        (0, None) => String::new(),
        _ => format!("×{}", holder.count),
    }
}

/// `holder` and its children to `depth` levels, in display order.
fn flatten<'a>(
    holder: &'a Holder,
    level: usize,
    depth: usize,
    rows: &mut Vec<(usize, &'a Holder)>,
) {
    rows.push((level, holder));
    if level < depth {
        for child in &holder.children {
            flatten(child, level + 1, depth, rows);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::holders::{
        HeapHolders,
        tests::{census_with, sample_holders},
    };

    #[test]
    fn roots_then_their_children_indented_with_sizes() {
        let report = HoldersReport::new(&census_with(sample_holders()), 2, Some(2));
        let text = render_text(&report, 2);
        let expected = "\
pid 42: 3 holders of 700000 objects, 61.0 MiB (paused)
NAME             TYPE          LENGTH    RETAINED        DEEP
__main__.ORDERS  list          200000    32.0 MiB    32.0 MiB
  [*]            app.Order    ×200000    30.0 MiB    30.0 MiB
    .__dict__    dict         ×200000    20.0 MiB    20.0 MiB
__main__.TOKENS  dict          100000    20.0 MiB    20.0 MiB
(1 more holders; --limit 0 shows all)
reachable from the holders 60.0 MiB, unreachable 2.0 KiB
not followed (opaque types): numpy.ndarray
warning: 3 frames unreadable
";
        assert_eq!(text, expected, "\n{text}");
        let roots_only = render_text(&report, 0);
        assert!(!roots_only.contains("[*]"), "{roots_only}");
    }

    #[test]
    fn a_census_without_holders_says_so() {
        let report = HoldersReport::new(&census_with(HeapHolders::default()), 20, Some(2));
        assert_eq!(
            render_text(&report, 2),
            "pid 42: 0 holders of 700000 objects, 61.0 MiB (paused)\n\
             no holders in this census\n\
             reachable from the holders 0 B, unreachable 0 B\n"
        );
    }
}
