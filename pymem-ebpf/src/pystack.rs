//! Reading the current Python stack out of the process's memory, at the
//! rare events that mark heap growth (new arena, sampled block), and
//! deduplicating stacks in `STACKS`.
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, generated},
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use pymem_common::{NO_OFFSET, PyFrame, PyLayout, PyStack, counter};

use crate::maps::map_error;

/// Per-process stack layout, written by the agent.
#[map]
pub static PY_LAYOUT: HashMap<u32, PyLayout> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

#[map]
pub static STACKS: HashMap<u64, PyStack> = HashMap::with_max_entries(32768, BPF_F_NO_PREALLOC);

/// Per-process bytes left until the next sampled block.
#[map]
pub static SAMPLER: HashMap<u32, u64> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Scratch space: a PyStack is too large for the 512-byte BPF stack.
#[map]
static SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(1, 0);

/// Reads a user integer, or 0 when unreadable. Deliberately branch-free:
/// the frame walk below must stay small for the verifier.
#[inline(always)]
fn read_or_zero<T: Default>(addr: u64) -> T {
    let mut value = T::default();
    unsafe {
        generated::bpf_probe_read_user(
            (&mut value as *mut T).cast(),
            size_of::<T>() as u32,
            addr as *const core::ffi::c_void,
        );
    }
    value
}

const EEXIST: i32 = 17;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Captures the Python stack of the current thread of `tgid` and returns
/// its id (0 when the process has no layout or no Python frame).
#[inline(always)]
pub fn capture(tgid: u32) -> u64 {
    let Some(layout) = (unsafe { PY_LAYOUT.get(tgid) }) else {
        return 0;
    };
    let Some(stack) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let stack = unsafe { &mut *stack };
    let mut tstate = read_or_zero::<u64>(layout.tstate_ptr_addr);
    for offset in layout.tstate_deref {
        if offset != NO_OFFSET && tstate != 0 {
            tstate = read_or_zero::<u64>(tstate + offset);
        }
    }
    if tstate == 0 {
        return 0;
    }
    let mut frame = read_or_zero::<u64>(tstate + layout.tstate_frame);
    if layout.cframe_frame != NO_OFFSET && frame != 0 {
        frame = read_or_zero::<u64>(frame + layout.cframe_frame);
    }
    let mut hash = FNV_OFFSET;
    let mut len = 0;
    for (depth, slot) in stack.frames.iter_mut().enumerate() {
        if frame == 0 {
            break;
        }
        let owner = read_or_zero::<u8>(frame + layout.frame_owner);
        // Shim frames keep their slot with code 0 (branch-free skip).
        let real = u64::from(u64::from(owner) < layout.first_shim_owner);
        // 3.14's `_PyStackRef` tags the low bit; objects are 8-aligned.
        let code = (read_or_zero::<u64>(frame + layout.frame_code) & !7) * real;
        let instr = read_or_zero::<u64>(frame + layout.frame_instr) * real;
        *slot = PyFrame { code, instr };
        hash = (hash ^ code).wrapping_mul(FNV_PRIME);
        hash = (hash ^ instr).wrapping_mul(FNV_PRIME);
        frame = read_or_zero::<u64>(frame + layout.frame_back);
        len = depth + 1;
    }
    if len == 0 {
        return 0;
    }
    stack.len = len as u64;
    // Zero is "no stack"; keep real ids away from it.
    let id = hash | 1;
    // An existing id is the same stack seen again, not a failure.
    if let Err(e) = STACKS.insert(id, &*stack, BPF_NOEXIST as u64)
        && e != -EEXIST
    {
        map_error::<{ counter::STACKS }>();
    }
    id
}

/// Byte sampling of blocks outside pymalloc: returns the sampling weight
/// when this block is sampled. Blocks of at least the period are always
/// sampled with their own size; smaller ones are sampled once per ~period
/// bytes (randomised stride) and stand for a period's worth of bytes.
#[inline(always)]
pub fn sample_weight(tgid: u32, size: u64) -> Option<u64> {
    let period = unsafe { PY_LAYOUT.get(tgid) }?.sample_period;
    if period == 0 {
        return None;
    }
    if size >= period {
        return Some(size);
    }
    let left = match SAMPLER.get_ptr_mut(tgid) {
        Some(ptr) => unsafe { &mut *ptr },
        None => {
            if SAMPLER.insert(tgid, next_stride(period), 0).is_err() {
                map_error::<{ counter::SAMPLER }>();
            }
            return None;
        }
    };
    if *left > size {
        *left -= size;
        return None;
    }
    *left = next_stride(period);
    Some(period)
}

#[inline(always)]
fn next_stride(period: u64) -> u64 {
    let jitter = unsafe { bpf_get_prandom_u32() } as u64 % period;
    period / 2 + jitter
}
