//! The live attribution of one process: which captured stack allocated
//! each sampled block still alive.
use std::collections::{BTreeMap, HashMap};

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

    /// Forgets the stacks that hold nothing any more beyond the `keep`
    /// that allocated most (a process that allocates from ever new stacks
    /// must not grow the agent); returns the ids forgotten.
    pub fn prune(&mut self, keep: usize) -> Vec<u64> {
        let mut dead: Vec<(u64, u64)> = self
            .stacks
            .iter()
            .filter(|(_, bytes)| bytes.live == 0)
            .map(|(&id, bytes)| (bytes.allocated, id))
            .collect();
        if dead.len() <= keep {
            return Vec::new();
        }
        dead.sort_unstable_by(|a, b| b.cmp(a));
        let gone: Vec<u64> = dead[keep..].iter().map(|&(_, id)| id).collect();
        for id in &gone {
            self.stacks.remove(id);
        }
        gone
    }
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
    fn pruning_forgets_only_stacks_that_hold_nothing_and_allocated_least() {
        let mut t = SiteTracker::default();
        for stack in 1..=5u64 {
            t.allocated(stack << 12, stack, stack * 100);
        }
        for stack in [1, 2, 4] {
            t.freed(stack << 12);
        }
        let mut gone = t.prune(1);
        gone.sort_unstable();
        assert_eq!(gone, [1, 2], "the emptied stacks but the biggest");
        let left: Vec<u64> = {
            let mut ids: Vec<u64> = t.stacks().map(|(id, _)| id).collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(left, [3, 4, 5]);
        assert!(t.prune(1).is_empty());
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
}
