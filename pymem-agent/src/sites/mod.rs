//! Allocation sites: which Python lines hold the memory. Arenas and sampled
//! blocks carry the stack that allocated them; when they are freed their
//! bytes leave that stack again, so sites show memory still held.
pub mod flamegraph;
pub mod pprof;
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::cpython::Frame;

/// Bytes attributed to one captured stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackBytes {
    pub live: u64,
    pub allocated: u64,
}

/// Live attribution for one process.
#[derive(Default)]
pub struct SiteTracker {
    /// block address -> (stack id, bytes it stands for); ordered, so that
    /// the blocks above a shrinking heap's new end can be dropped.
    blocks: BTreeMap<u64, (u64, u64)>,
    stacks: HashMap<u64, StackBytes>,
}

impl SiteTracker {
    pub fn allocated(&mut self, addr: u64, stack_id: u64, bytes: u64) {
        if let Some((old_stack, old_bytes)) = self.blocks.insert(addr, (stack_id, bytes)) {
            // A missed free (e.g. lost event): the old block is gone.
            self.release(old_stack, old_bytes);
        }
        let entry = self.stacks.entry(stack_id).or_default();
        entry.live += bytes;
        entry.allocated += bytes;
    }

    pub fn freed(&mut self, addr: u64) {
        if let Some((stack_id, bytes)) = self.blocks.remove(&addr) {
            self.release(stack_id, bytes);
        }
    }

    /// Everything sampled in `[start, end)` is gone (the heap shrank).
    pub fn freed_range(&mut self, start: u64, end: u64) {
        let gone: Vec<u64> = self.blocks.range(start..end).map(|(&a, _)| a).collect();
        for addr in gone {
            self.freed(addr);
        }
    }

    fn release(&mut self, stack_id: u64, bytes: u64) {
        if let Some(entry) = self.stacks.get_mut(&stack_id) {
            entry.live = entry.live.saturating_sub(bytes);
        }
    }

    pub fn stacks(&self) -> impl Iterator<Item = (u64, StackBytes)> + '_ {
        self.stacks.iter().map(|(&id, &bytes)| (id, bytes))
    }
}

/// One line of Python that allocated memory, innermost frame of its
/// stacks; `stack` is the heaviest full stack through it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Site {
    pub function: String,
    pub file: String,
    pub line: i64,
    /// Bytes allocated here and still live (estimated from samples).
    pub bytes: u64,
    /// Bytes allocated here since observation started.
    pub allocated_bytes: u64,
    pub stack: Vec<Frame>,
}

/// `file:line`, or `<unknown>:0` (as tracemalloc writes it) for memory
/// allocated with no Python frame on the stack.
pub fn location(file: &str, line: i64) -> String {
    if file.is_empty() {
        "<unknown>:0".to_string()
    } else {
        format!("{file}:{line}")
    }
}

/// Groups symbolised stacks by their innermost frame, heaviest first.
pub fn group_sites(stacks: Vec<(Vec<Frame>, StackBytes)>) -> Vec<Site> {
    let mut by_line: HashMap<Frame, (StackBytes, Vec<Frame>, u64)> = HashMap::new();
    for (frames, bytes) in stacks {
        let Some(top) = frames.first().cloned() else {
            continue;
        };
        let entry = by_line
            .entry(top)
            .or_insert_with(|| (StackBytes::default(), Vec::new(), 0));
        entry.0.live += bytes.live;
        entry.0.allocated += bytes.allocated;
        let weight = bytes.live.max(bytes.allocated / 1024);
        if entry.1.is_empty() || weight > entry.2 {
            entry.1 = frames;
            entry.2 = weight;
        }
    }
    let mut sites: Vec<Site> = by_line
        .into_iter()
        .map(|(top, (bytes, stack, _))| Site {
            function: top.function,
            file: top.file,
            line: top.line,
            bytes: bytes.live,
            allocated_bytes: bytes.allocated,
            stack,
        })
        .collect();
    sites.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(b.allocated_bytes.cmp(&a.allocated_bytes))
            .then(a.file.cmp(&b.file))
            .then(a.line.cmp(&b.line))
    });
    sites
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shrinking_heap_frees_the_samples_above_its_new_end() {
        let mut t = SiteTracker::default();
        t.allocated(0x1000, 1, 300);
        t.allocated(0x2000, 2, 200);
        t.allocated(0x3000, 2, 100);
        t.freed_range(0x2000, 0x4000);
        let live: HashMap<u64, u64> = t.stacks().map(|(id, b)| (id, b.live)).collect();
        assert_eq!(live[&1], 300);
        assert_eq!(live[&2], 0);
        t.freed(0x2000);
        t.freed_range(0, 0x1000);
        assert_eq!(t.stacks().find(|(id, _)| *id == 1).unwrap().1.live, 300);
    }

    #[test]
    fn frees_leave_the_site_that_allocated() {
        let mut t = SiteTracker::default();
        t.allocated(0x1000, 7, 1 << 20);
        t.allocated(0x2000, 7, 1 << 20);
        t.allocated(0x3000, 9, 1 << 20);
        t.freed(0x1000);
        t.freed(0x3000);
        t.freed(0x9999); // never seen: ignored
        let stacks: HashMap<u64, StackBytes> = t.stacks().collect();
        assert_eq!(
            stacks[&7],
            StackBytes {
                live: 1 << 20,
                allocated: 2 << 20
            }
        );
        assert_eq!(
            stacks[&9],
            StackBytes {
                live: 0,
                allocated: 1 << 20
            }
        );
    }

    #[test]
    fn sites_group_by_innermost_frame_and_sort_by_live_bytes() {
        let sites = group_sites(vec![
            (
                vec![Frame::in_app("churn", 5), Frame::in_app("main", 1)],
                StackBytes {
                    live: 0,
                    allocated: 900,
                },
            ),
            (
                vec![Frame::in_app("leak", 9), Frame::in_app("a", 2)],
                StackBytes {
                    live: 300,
                    allocated: 300,
                },
            ),
            (
                vec![Frame::in_app("leak", 9), Frame::in_app("b", 3)],
                StackBytes {
                    live: 500,
                    allocated: 500,
                },
            ),
        ]);
        assert_eq!(sites[0].function, "leak");
        assert_eq!(sites[0].bytes, 800);
        assert_eq!(sites[0].stack[1].function, "b", "heaviest stack kept");
        assert_eq!(sites[1].function, "churn");
        assert_eq!(sites[1].bytes, 0);
    }
}
