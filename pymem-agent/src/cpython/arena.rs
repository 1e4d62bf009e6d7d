//! Checking the version's arena size at run time. The arena probes keep only
//! mappings of the size derived from the version (256 KiB up to 3.9, 1 MiB
//! since); the kernel side also counts anonymous private read-write mappings
//! through the interpreter's `mmap` that look like arenas (powers of two of
//! at least 256 KiB) but have another size. When those recur and outnumber
//! the arenas of the expected size, the guess is wrong and the process's
//! heap would silently miss its arenas: it is reported instead.
use pymem_common::ProcStats;

/// One stray mapping is a thread's data-stack chunk or a one-off buffer;
/// arenas come in numbers.
const RECURRING: u64 = 3;

/// Evidence that a process's arenas are not the expected size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaSizeMismatch {
    pub expected: u64,
    /// Arena-like mappings of another size, and their mean size.
    pub mismatches: u64,
    pub mean_size: u64,
    /// Mappings of the expected size seen meanwhile.
    pub matching: u64,
}

impl std::fmt::Display for ArenaSizeMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} anonymous mappings of {} KiB on average through the interpreter's mmap, but only {} of the expected {} KiB arena size",
            self.mismatches,
            self.mean_size >> 10,
            self.matching,
            self.expected >> 10
        )
    }
}

/// `Some` when arena-like mappings of another size recur and outnumber the
/// arenas of the expected size.
pub fn arena_size_mismatch(stats: &ProcStats, expected: u64) -> Option<ArenaSizeMismatch> {
    let mismatches = stats.arena_size_mismatches;
    if mismatches < RECURRING || mismatches <= stats.arena_allocs {
        return None;
    }
    Some(ArenaSizeMismatch {
        expected,
        mismatches,
        mean_size: stats.arena_size_mismatch_bytes / mismatches,
        matching: stats.arena_allocs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(arenas: u64, mismatches: u64, size: u64) -> ProcStats {
        ProcStats {
            arena_allocs: arenas,
            arena_size_mismatches: mismatches,
            arena_size_mismatch_bytes: mismatches * size,
            ..ProcStats::default()
        }
    }

    #[test]
    fn recurring_arenas_of_another_size_are_a_wrong_guess() {
        let found = arena_size_mismatch(&stats(0, 40, 256 << 10), 1 << 20).unwrap();
        assert_eq!(found.mean_size, 256 << 10);
        assert_eq!(found.mismatches, 40);
        let text = found.to_string();
        assert!(
            text.contains("256 KiB") && text.contains("1024 KiB"),
            "{text}"
        );
    }

    #[test]
    fn stray_mappings_beside_real_arenas_are_not() {
        // A deep recursion's 512 KiB data-stack chunk, twice.
        assert_eq!(arena_size_mismatch(&stats(0, 2, 512 << 10), 1 << 20), None);
        // More arenas of the right size than strays.
        assert_eq!(arena_size_mismatch(&stats(50, 5, 512 << 10), 1 << 20), None);
        assert_eq!(arena_size_mismatch(&stats(0, 0, 0), 256 << 10), None);
    }
}
