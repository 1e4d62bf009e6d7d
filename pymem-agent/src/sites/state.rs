//! Sites attributed by heap state: each census root's retained bytes go to
//! the lines that fill it (its writers), so a line's bytes are what the
//! holders it stores into keep alive now. Unlike allocation samples, which
//! charge whoever asks for the next arena (mostly churning code), this
//! follows what stays live: code that builds and drops temporaries holds
//! no root and gets nothing.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Site;
use crate::{census::Census, cpython::Frame};

/// How a process's sites were attributed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// From an object census: holders and the lines that fill them.
    HeapState,
    /// From allocation samples: the stacks that triggered new arenas and
    /// sampled large blocks. Biased toward code that allocates often.
    AllocationSamples,
}

/// A process's sites as `/api/v1/processes/{pid}/sites?report=1` serves
/// them: how they were attributed and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SitesReport {
    pub pid: u32,
    pub attribution: Attribution,
    /// Why the sites are not attributed by heap state (no census for this
    /// build, the census failed, `?attribution=samples`), or what the
    /// heap-state sites leave out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The census the sites come from (unix seconds), for heap state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub census_taken_at: Option<f64>,
    /// Bytes of the heap no root holds (garbage awaiting collection,
    /// objects only C code references), for heap state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unheld_bytes: Option<u64>,
    pub sites: Vec<Site>,
}

/// What heap-state sites from a census of a damaged heap leave out: its
/// objects whose sizes cannot be true count at their base size.
pub fn damage_note(census: &Census) -> Option<String> {
    let damaged = census.heap.damaged_objects;
    (damaged > 0).then(|| {
        format!(
            "the heap is damaged: {damaged} objects claim more memory than they have and count at their base size"
        )
    })
}

/// Where a root with no writer found is listed: its name in place of a
/// file, line 0.
pub const NO_WRITER: &str = "<no writer found>";

/// The sites of `census`: every root's retained bytes shared among its
/// writers (a root nobody was found to fill is a site of its own),
/// heaviest first.
pub fn from_census(census: &Census) -> Vec<Site> {
    let mut by_line: HashMap<(String, String, i64), Site> = HashMap::new();
    for holder in &census.heap.holders.holders {
        if holder.writers.is_empty() {
            let frame = Frame {
                function: NO_WRITER.into(),
                file: format!("<{}>", holder.name),
                line: 0,
            };
            let site = Site {
                function: frame.function.clone(),
                file: frame.file.clone(),
                line: 0,
                bytes: holder.retained_bytes,
                allocated_bytes: holder.retained_bytes,
                stack: vec![frame],
                holder: Some(holder.name.clone()),
                ..Default::default()
            };
            by_line.insert((site.function.clone(), site.file.clone(), 0), site);
            continue;
        }
        let share = holder.retained_bytes / holder.writers.len() as u64;
        for writer in &holder.writers {
            let key = (writer.function.clone(), writer.file.clone(), writer.line);
            let site = by_line.entry(key).or_insert_with(|| Site {
                function: writer.function.clone(),
                file: writer.file.clone(),
                line: writer.line,
                stack: vec![Frame {
                    function: writer.function.clone(),
                    file: writer.file.clone(),
                    line: writer.line,
                }],
                holder: Some(holder.name.clone()),
                store: Some(writer.store.clone()),
                ..Default::default()
            });
            // A line filling several roots is named after its heaviest.
            site.bytes += share;
            site.allocated_bytes += share;
        }
    }
    let mut sites: Vec<Site> = by_line.into_values().collect();
    // Each site's allocated bytes are its live bytes: the order is the
    // samples' order.
    super::grouping::sort_heaviest_first(&mut sites);
    sites
}

/// Gives each site the callers of its line where allocation samples saw
/// them: the heaviest sampled stack through the site's function (same
/// function and file), from that frame outward, below the site's own
/// frame. A census knows which line fills a holder, not who called it.
pub fn with_callers(sites: &mut [Site], sampled: &[Site]) {
    let mut callers: HashMap<(&str, &str), (u64, &[Frame])> = HashMap::new();
    for site in sampled {
        let weight = site.bytes.max(site.allocated_bytes / 1024);
        for (depth, frame) in site.stack.iter().enumerate() {
            let entry = callers
                .entry((frame.function.as_str(), frame.file.as_str()))
                .or_insert((0, &[]));
            if entry.1.is_empty() || weight > entry.0 {
                *entry = (weight, &site.stack[depth + 1..]);
            }
        }
    }
    for site in sites {
        if let Some(&(_, outer)) = callers.get(&(site.function.as_str(), site.file.as_str())) {
            site.stack.truncate(1);
            site.stack.extend_from_slice(outer);
        }
    }
}

/// What the heap-state sites of `census` leave out.
pub fn unheld_bytes(census: &Census) -> u64 {
    let held: u64 = census
        .heap
        .holders
        .holders
        .iter()
        .map(|h| h.retained_bytes)
        .sum();
    census.heap.object_bytes.saturating_sub(held)
}

/// Whether `census` has holders to attribute by, or why not.
pub fn usable(census: &Census) -> Result<(), String> {
    let holders = &census.heap.holders;
    if holders.holders.is_empty() {
        return Err(holders.warnings.first().cloned().unwrap_or_else(|| {
            "the census found no holders (no module globals, class attributes or frame locals)"
                .into()
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_get_the_callers_samples_saw_through_their_function() {
        let frame = |function: &str, line| Frame::in_app(function, line);
        let mut sites = vec![
            Site::of_stack(vec![frame("handle", 34)], 600, 600),
            Site::of_stack(vec![frame("warm", 50)], 300, 300),
        ];
        let sampled = vec![
            Site::of_stack(
                vec![frame("handle", 30), frame("dispatch", 8), frame("main", 2)],
                10,
                10,
            ),
            Site::of_stack(vec![frame("handle", 31), frame("retry", 9)], 1, 1),
        ];
        with_callers(&mut sites, &sampled);
        let lines: Vec<(&str, i64)> = sites[0]
            .stack
            .iter()
            .map(|f| (f.function.as_str(), f.line))
            .collect();
        assert_eq!(lines, vec![("handle", 34), ("dispatch", 8), ("main", 2)]);
        assert_eq!(sites[1].stack.len(), 1, "no samples through warm");
    }
    use crate::cpython::heap::{HeapCensus, HeapHolders, Holder, Writer};

    fn writer(function: &str, line: i64, store: &str) -> Writer {
        Writer {
            function: function.into(),
            file: "app.py".into(),
            line,
            store: store.into(),
        }
    }

    fn census(holders: Vec<Holder>) -> Census {
        Census {
            pid: 1,
            taken_at: 0.0,
            consistency: "paused".into(),
            pause_seconds: 0.0,
            copy_seconds: 0.0,
            parse_seconds: 0.0,
            cpu_seconds: 0.0,
            copied_bytes: 0,
            heap: HeapCensus {
                object_bytes: 1000,
                holders: HeapHolders {
                    holders,
                    ..Default::default()
                },
                ..Default::default()
            },
        }
    }

    #[test]
    fn roots_go_to_their_writers_and_unfilled_roots_stand_alone() {
        let cache = Holder {
            name: "__main__.CACHE".into(),
            retained_bytes: 600,
            writers: vec![
                writer("handle", 34, "CACHE[key] ="),
                writer("warm", 50, "CACHE[key] ="),
            ],
            ..Default::default()
        };
        let visitors = Holder {
            name: "__main__.VISITORS".into(),
            retained_bytes: 250,
            writers: vec![writer("handle", 34, "VISITORS.append()")],
            ..Default::default()
        };
        let config = Holder {
            name: "app.CONFIG".into(),
            retained_bytes: 100,
            ..Default::default()
        };
        let census = census(vec![cache, visitors, config]);
        let sites = from_census(&census);
        let found: Vec<(&str, i64, u64)> = sites
            .iter()
            .map(|s| (s.function.as_str(), s.line, s.bytes))
            .collect();
        assert_eq!(
            found,
            vec![("handle", 34, 550), ("warm", 50, 300), (NO_WRITER, 0, 100)]
        );
        assert_eq!(sites[0].holder.as_deref(), Some("__main__.CACHE"));
        assert_eq!(sites[2].stack[0].file, "<app.CONFIG>", "a stack of its own");
        assert_eq!(sites[2].file, "<app.CONFIG>");
        assert_eq!(unheld_bytes(&census), 50);
        assert!(usable(&census).is_ok());
    }
}
