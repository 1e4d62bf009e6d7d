//! Types shared by the eBPF programs and the agent.
//!
//! Everything that crosses the kernel boundary is `#[repr(C)]` and made of
//! plain integers: no enums, no `Option`, no padding the verifier could trip
//! over. Kinds are `u32` constants.
#![no_std]

/// Event kinds written to the `EVENTS` ring buffer.
pub mod event_kind {
    /// A task called execve; `tgid` is the new image's process.
    pub const EXEC: u32 = 1;
    /// A thread-group leader exited.
    pub const EXIT: u32 = 2;
    /// A process forked; `tgid` is the child, `addr` the parent's tgid.
    pub const FORK: u32 = 3;
    /// A pymalloc arena was mapped at `addr` with `size` bytes.
    pub const ARENA_ALLOC: u32 = 4;
    /// A pymalloc arena at `addr` (`size` bytes) was unmapped.
    pub const ARENA_FREE: u32 = 5;
    /// The process used up its probe-hit budget (token bucket); `size` is
    /// its budgeted probe hits so far.
    pub const BUDGET_EXCEEDED: u32 = 6;
    /// A sampled block outside pymalloc (raw or extension) at `addr`;
    /// `size` is its sampling weight in bytes, `stack_id` where it came from.
    /// Under syscall accounting also a sampled anonymous mapping.
    pub const BLOCK_SAMPLE: u32 = 7;
    /// A sampled block at `addr` was freed.
    pub const BLOCK_SAMPLE_FREE: u32 = 8;
    /// Under syscall accounting, the libc heap shrank: `addr` is the new
    /// break, `size` the bytes given back. Blocks sampled above it are gone.
    pub const HEAP_SHRINK: u32 = 9;
    /// The kernel's OOM killer chose a victim (any process, observed or
    /// not: OOM kills are rare and the agent decides). `tgid` is the
    /// victim's pid as the record names it (the thread of the victim that
    /// holds its memory, nearly always the group leader), `tid` the task
    /// whose allocation failed, `size` the victim's anonymous RSS in bytes
    /// (0 where the kernel's record has no `anon_rss`: older kernels give
    /// only the pid).
    pub const OOM_KILL: u32 = 10;
}

/// Deepest Python stack captured, innermost frame first.
pub const MAX_STACK_DEPTH: usize = 48;

/// Marks a live-block size whose allocation was sampled with a stack, so
/// its free is reported too.
pub const SAMPLED_BIT: u64 = 1 << 63;

/// Offsets "not present in this version".
pub const NO_OFFSET: u64 = u64::MAX;

/// One Python frame as captured in the kernel: the code object and the
/// instruction pointer (3.11+) or last-instruction index (3.8–3.10).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrame {
    pub code: u64,
    pub instr: u64,
}

/// A captured Python stack, deduplicated in the `STACKS` map by `stack_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyStack {
    pub len: u64,
    pub frames: [PyFrame; MAX_STACK_DEPTH],
}

/// Where a process keeps its current Python stack, computed by the agent
/// from the interpreter version and load address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyLayout {
    /// Start of the pointer chain to the `PyThreadState` holding the GIL:
    /// 3.8–3.11 `&_PyRuntime.gilstate.tstate_current`; 3.12+
    /// `&_PyRuntime.interpreters.head`, then `->ceval.gil->last_holder`.
    pub tstate_ptr_addr: u64,
    /// Up to two further dereferences (offsets), NO_OFFSET when unused.
    pub tstate_deref: [u64; 2],
    /// PyThreadState -> frame (3.8–3.10, 3.13+) or -> cframe (3.11, 3.12).
    pub tstate_frame: u64,
    /// CFrame -> current_frame, or NO_OFFSET.
    pub cframe_frame: u64,
    /// The frame's code object; its low 3 bits are masked off (3.14 keeps
    /// a tag there: `_PyStackRef`).
    pub frame_code: u64,
    pub frame_back: u64,
    pub frame_instr: u64,
    /// Frame owner byte and the first owner value marking frames that are
    /// not Python functions (C-stack and interpreter shim frames, 3.12+);
    /// those are recorded with code 0. Older versions point at a byte that
    /// never reaches `first_shim_owner` (0xff: an aligned pointer's low byte).
    pub frame_owner: u64,
    pub first_shim_owner: u64,
    /// Mean bytes between sampled allocations outside pymalloc; 0 = off.
    pub sample_period: u64,
}

/// One ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    pub tgid: u32,
    /// Thread id (kernel pid) that produced the event.
    pub tid: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` at the event.
    pub ts_ns: u64,
    pub addr: u64,
    pub size: u64,
    /// Python stack of the allocation (0: none captured).
    pub stack_id: u64,
}

/// Per-process counters kept by the kernel side in a per-CPU hash map keyed
/// by tgid. Userspace sums the per-CPU copies.
///
/// Sources:
/// - `arena`: pymalloc arenas mapped/unmapped by the interpreter,
/// - `raw`: blocks the interpreter took from libc `malloc` (requests that
///   leave pymalloc, > 512 bytes, and the raw domain),
/// - `ext`: extension buffers reported with `PyTraceMalloc_Track/Untrack`,
/// - `sys`: brk/mmap growth outside pymalloc while a process is under
///   syscall accounting (after it exceeded its probe budget).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStats {
    pub arena_alloc_bytes: u64,
    pub arena_free_bytes: u64,
    pub arena_allocs: u64,
    pub arena_frees: u64,
    pub raw_alloc_bytes: u64,
    pub raw_free_bytes: u64,
    pub raw_allocs: u64,
    pub raw_frees: u64,
    pub ext_alloc_bytes: u64,
    pub ext_free_bytes: u64,
    pub ext_allocs: u64,
    pub ext_frees: u64,
    pub sys_alloc_bytes: u64,
    pub sys_free_bytes: u64,
    /// Hits of the PID-scoped (budgeted) probes: raw malloc family and
    /// extension track/untrack, return probes included.
    pub probe_hits: u64,
    /// Allocations that could not be remembered because a live-block map
    /// was full; their bytes are not in any `*_alloc_bytes`.
    pub untracked_allocs: u64,
    /// Anonymous private read-write mappings made through the interpreter's
    /// `mmap` whose size looks like an arena (a power of two of at least
    /// 256 KiB) but is not the expected arena size: recurring ones mean the
    /// arena size, hence the version, was guessed wrong.
    pub arena_size_mismatches: u64,
    /// Bytes of those mappings (their mean size tells the real arena size).
    pub arena_size_mismatch_bytes: u64,
    /// Garbage collections started, per generation (0, 1, 2), seen by the
    /// GC probes while they were attached.
    pub gc_collections: [u64; 3],
    /// Nanoseconds between the start and the end of those collections.
    pub gc_ns: u64,
    /// Objects the ended collections found unreachable (collected plus
    /// uncollectable: what CPython's `gc__done` probe and its collector
    /// return report).
    pub gc_unreachable_objects: u64,
}

impl ProcStats {
    /// Adds another CPU's copy into this one.
    pub fn accumulate(&mut self, other: &ProcStats) {
        self.arena_alloc_bytes += other.arena_alloc_bytes;
        self.arena_free_bytes += other.arena_free_bytes;
        self.arena_allocs += other.arena_allocs;
        self.arena_frees += other.arena_frees;
        self.raw_alloc_bytes += other.raw_alloc_bytes;
        self.raw_free_bytes += other.raw_free_bytes;
        self.raw_allocs += other.raw_allocs;
        self.raw_frees += other.raw_frees;
        self.ext_alloc_bytes += other.ext_alloc_bytes;
        self.ext_free_bytes += other.ext_free_bytes;
        self.ext_allocs += other.ext_allocs;
        self.ext_frees += other.ext_frees;
        self.sys_alloc_bytes += other.sys_alloc_bytes;
        self.sys_free_bytes += other.sys_free_bytes;
        self.probe_hits += other.probe_hits;
        self.untracked_allocs += other.untracked_allocs;
        self.arena_size_mismatches += other.arena_size_mismatches;
        self.arena_size_mismatch_bytes += other.arena_size_mismatch_bytes;
        for (mine, theirs) in self.gc_collections.iter_mut().zip(other.gc_collections) {
            *mine += theirs;
        }
        self.gc_ns += other.gc_ns;
        self.gc_unreachable_objects += other.gc_unreachable_objects;
    }
}

/// Key of the live-block maps: one allocation of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// An allocation call in flight between its entry and return probe, keyed by
/// the thread (`pid_tgid`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingCall {
    /// Bytes requested.
    pub size: u64,
    /// For realloc: the block being resized (0 for malloc/calloc/mmap).
    pub old_addr: u64,
}

/// Per-process token bucket of the kernel-side probe budget: refilled at
/// the budgeted rate, one token per probe hit. Its capacity starts at the
/// first burst and grows by one hit for each hit spent within budget, up to
/// the burst size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetState {
    /// Tokens in units of 1e-9 hit (so refill is `elapsed_ns * rate`).
    pub nano_tokens: u64,
    pub last_ns: u64,
    /// Non-zero once BUDGET_EXCEEDED was sent for this process.
    pub notified: u32,
    /// Hits the bucket holds at most, for now.
    pub capacity_hits: u32,
}

/// Per-process state of syscall accounting (processes over budget).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallModeState {
    /// Last program break seen; 0 until the first brk returns.
    pub brk: u64,
    /// The arena size of this interpreter: anonymous mappings of exactly
    /// this size are pymalloc's and already counted by the arena probes.
    pub arena_size: u64,
}

/// Pending mmap syscall of a process under syscall accounting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingMmap {
    pub len: u64,
}

/// Names of the maps and programs in the eBPF object, as the agent looks
/// them up. The kernel side's statics carry the same identifiers (aya-ebpf
/// names a map after its static); the agent's tests check every name here
/// against the built object.
pub mod names {
    /// Defines each name as a constant, and `ALL`, every one of them.
    macro_rules! names {
        ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
            $($(#[$doc])* pub const $name: &str = $value;)*
            /// Every name of this module.
            pub const ALL: &[&str] = &[$($name),*];
        };
    }

    pub mod map {
        names! {
            EVENTS = "EVENTS",
            COUNTERS = "COUNTERS",
            PROC_STATS = "PROC_STATS",
            TRACKED = "TRACKED",
            ARENAS = "ARENAS",
            RAW_LIVE = "RAW_LIVE",
            EXT_LIVE = "EXT_LIVE",
            SYS_LIVE = "SYS_LIVE",
            PENDING_ARENA = "PENDING_ARENA",
            PENDING_RAW = "PENDING_RAW",
            PENDING_MMAP = "PENDING_MMAP",
            PENDING_GC = "PENDING_GC",
            BUDGET = "BUDGET",
            SYSCALL_MODE = "SYSCALL_MODE",
            PY_LAYOUT = "PY_LAYOUT",
            STACKS = "STACKS",
            SAMPLER = "SAMPLER",
        }
    }

    pub mod program {
        names! {
            ARENA_MMAP = "arena_mmap",
            ARENA_MMAP_RET = "arena_mmap_ret",
            ARENA_MUNMAP = "arena_munmap",
            /// The entry of every per-process hook, told apart by the cookie.
            BUDGETED_ENTRY = "budgeted_entry",
            /// The return of malloc/calloc/realloc.
            RAW_ALLOC_RET = "raw_alloc_ret",
            PROCESS_EXEC = "process_exec",
            PROCESS_EXIT = "process_exit",
            PROCESS_FORK = "process_fork",
            SYS_EXIT_BRK = "sys_exit_brk",
            SYS_ENTER_MMAP = "sys_enter_mmap",
            SYS_EXIT_MMAP = "sys_exit_mmap",
            SYS_ENTER_MUNMAP = "sys_enter_munmap",
            OOM_MARK_VICTIM = "oom_mark_victim",
        }
    }

    /// Load-time globals of the kernel side.
    pub mod global {
        names! {
            HIT_BUDGET_PER_SEC = "HIT_BUDGET_PER_SEC",
            HIT_BUDGET_BURST = "HIT_BUDGET_BURST",
            HIT_BUDGET_FIRST_BURST = "HIT_BUDGET_FIRST_BURST",
            FORK_CHILD_PID_OFFSET = "FORK_CHILD_PID_OFFSET",
            OOM_VICTIM_PID_OFFSET = "OOM_VICTIM_PID_OFFSET",
            OOM_VICTIM_ANON_RSS_OFFSET = "OOM_VICTIM_ANON_RSS_OFFSET",
        }
    }
}

/// Index of the drop and error counters in the `COUNTERS` per-CPU array.
pub mod counter {
    use super::names::map;

    /// Ring-buffer records lost because the buffer was full.
    pub const EVENTS_LOST: u32 = 0;
    /// Live-block map insertions that failed (map full), of all four maps;
    /// each is also counted under its own map below.
    pub const LIVE_MAP_FULL: u32 = 1;
    /// Failed insertions into one map made by the kernel side.
    pub const PROC_STATS: u32 = 2;
    pub const PENDING_ARENA: u32 = 3;
    pub const PENDING_RAW: u32 = 4;
    pub const PENDING_MMAP: u32 = 5;
    pub const STACKS: u32 = 6;
    pub const BUDGET: u32 = 7;
    pub const SAMPLER: u32 = 8;
    pub const ARENAS: u32 = 9;
    pub const RAW_LIVE: u32 = 10;
    pub const EXT_LIVE: u32 = 11;
    pub const SYS_LIVE: u32 = 12;
    pub const PENDING_GC: u32 = 13;
    pub const LEN: u32 = 14;

    /// The counters of failures per map, with the map's name: a full ring
    /// buffer is `EVENTS_LOST`.
    pub const MAP_ERRORS: [(u32, &str); 13] = [
        (EVENTS_LOST, map::EVENTS),
        (PROC_STATS, map::PROC_STATS),
        (PENDING_ARENA, map::PENDING_ARENA),
        (PENDING_RAW, map::PENDING_RAW),
        (PENDING_MMAP, map::PENDING_MMAP),
        (STACKS, map::STACKS),
        (BUDGET, map::BUDGET),
        (SAMPLER, map::SAMPLER),
        (ARENAS, map::ARENAS),
        (RAW_LIVE, map::RAW_LIVE),
        (EXT_LIVE, map::EXT_LIVE),
        (SYS_LIVE, map::SYS_LIVE),
        (PENDING_GC, map::PENDING_GC),
    ];

    /// The map a counter counts failures of ("" for `LIVE_MAP_FULL`, which
    /// sums four).
    pub const fn name(index: u32) -> &'static str {
        let mut i = 0;
        while i < MAP_ERRORS.len() {
            if MAP_ERRORS[i].0 == index {
                return MAP_ERRORS[i].1;
            }
            i += 1;
        }
        ""
    }
}

/// Attach cookies of the per-process entry probes: which function of the
/// interpreter the probe sits on. One program serves them all, so a process
/// needs one multi-uprobe link for its entries (and one for the returns of
/// malloc/calloc/realloc). Arena probes carry the arena size instead.
pub mod cookie {
    pub const MALLOC: u64 = 1;
    pub const CALLOC: u64 = 2;
    pub const REALLOC: u64 = 3;
    pub const FREE: u64 = 4;
    /// `PyTraceMalloc_Track`.
    pub const TRACK: u64 = 5;
    /// `PyTraceMalloc_Untrack`.
    pub const UNTRACK: u64 = 6;
    /// A garbage collection starts; the cookie's upper bits say where its
    /// generation is ([`super::probe_arg`]).
    pub const GC_START: u64 = 7;
    /// A garbage collection ends; the upper bits say where the count of
    /// unreachable objects is.
    pub const GC_DONE: u64 = 8;

    /// The kind of probe a cookie names (its upper bits may carry more).
    pub const fn kind(cookie: u64) -> u64 {
        cookie & 0xff
    }
}

/// Where a probe finds one integer argument: a register, or memory at a
/// register plus a displacement (USDT's `-4@112(%rsp)`, `-8@%r12`), or a
/// constant. Packed into the upper bits of an attach cookie so that the one
/// entry program can read it:
/// bits 8–15 the register ([`probe_arg::reg`]), bit 16 "read memory", bits
/// 17–20 the size in bytes, bit 21 signed, bits 32–63 the displacement (or
/// the constant).
pub mod probe_arg {
    /// Registers, by the agent's numbering (x86-64 `pt_regs` fields).
    pub mod reg {
        pub const NONE: u64 = 0;
        pub const RAX: u64 = 1;
        pub const RBX: u64 = 2;
        pub const RCX: u64 = 3;
        pub const RDX: u64 = 4;
        pub const RSI: u64 = 5;
        pub const RDI: u64 = 6;
        pub const RBP: u64 = 7;
        pub const RSP: u64 = 8;
        pub const R8: u64 = 9;
        pub const R9: u64 = 10;
        pub const R10: u64 = 11;
        pub const R11: u64 = 12;
        pub const R12: u64 = 13;
        pub const R13: u64 = 14;
        pub const R14: u64 = 15;
        pub const R15: u64 = 16;
    }

    const MEMORY: u64 = 1 << 16;
    const SIGNED: u64 = 1 << 21;

    /// The cookie of probe `kind` reading its argument as described.
    pub const fn encode(
        kind: u64,
        register: u64,
        memory: bool,
        size: u64,
        signed: bool,
        displacement: i32,
    ) -> u64 {
        (kind & 0xff)
            | ((register & 0xff) << 8)
            | if memory { MEMORY } else { 0 }
            | ((size & 0xf) << 17)
            | if signed { SIGNED } else { 0 }
            | ((displacement as u32 as u64) << 32)
    }

    pub const fn register(cookie: u64) -> u64 {
        (cookie >> 8) & 0xff
    }

    pub const fn is_memory(cookie: u64) -> bool {
        cookie & MEMORY != 0
    }

    pub const fn size(cookie: u64) -> u64 {
        (cookie >> 17) & 0xf
    }

    pub const fn is_signed(cookie: u64) -> bool {
        cookie & SIGNED != 0
    }

    pub const fn displacement(cookie: u64) -> i64 {
        (cookie >> 32) as u32 as i32 as i64
    }

    /// Sign- or zero-extends the low `size` bytes of `raw` as the cookie
    /// says.
    pub const fn extend(cookie: u64, raw: u64) -> i64 {
        let bits = size(cookie) * 8;
        if bits == 0 || bits >= 64 {
            return raw as i64;
        }
        let shift = 64 - bits;
        if is_signed(cookie) {
            ((raw << shift) as i64) >> shift
        } else {
            ((raw << shift) >> shift) as i64
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for ProcStats {}
    unsafe impl aya::Pod for BlockKey {}
    unsafe impl aya::Pod for PendingCall {}
    unsafe impl aya::Pod for BudgetState {}
    unsafe impl aya::Pod for SyscallModeState {}
    unsafe impl aya::Pod for PendingMmap {}
    unsafe impl aya::Pod for PyFrame {}
    unsafe impl aya::Pod for PyStack {}
    unsafe impl aya::Pod for PyLayout {}
}
