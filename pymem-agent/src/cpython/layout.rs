//! One process's stack layout: its version's offsets placed at the address
//! its interpreter is loaded at, for the kernel walk and the symbolizer.
use anyhow::{Result, anyhow};
use pymem_common::PyLayout;

use super::offsets::{CodeOffsets, offsets_for};
use crate::discover::{self, Binary};

/// What the agent needs to symbolise one process's frames.
#[derive(Clone, Copy, Debug)]
pub struct ProcessLayout {
    pub kernel: PyLayout,
    pub code: CodeOffsets,
}

/// The stack layout of one process: version offsets plus where its
/// interpreter is loaded. `None` (with the reason) where stacks are not
/// supported for this build.
pub fn layout_for(pid: u32, binary: &Binary, sample_period: u64) -> Result<ProcessLayout> {
    let interp = &binary.interpreter;
    let offsets = offsets_for(interp)
        .ok_or_else(|| anyhow!("Python stacks are not supported for {} yet", interp.version))?;
    let runtime = interp
        .runtime_vaddr
        .ok_or_else(|| anyhow!("{} exports no _PyRuntime", binary.display_path))?;
    let bias = load_bias(pid, binary)?;
    Ok(ProcessLayout {
        kernel: PyLayout {
            tstate_ptr_addr: bias + runtime + offsets.runtime_tstate_chain,
            tstate_deref: offsets.tstate_deref,
            tstate_frame: offsets.tstate_frame,
            cframe_frame: offsets.cframe_frame,
            frame_code: offsets.frame_code,
            frame_back: offsets.frame_back,
            frame_instr: offsets.frame_instr,
            frame_owner: offsets.frame_owner,
            first_shim_owner: offsets.first_shim_owner,
            sample_period,
        },
        code: offsets.code,
    })
}

/// Where the binary's first segment is mapped, minus its link address.
pub(crate) fn load_bias(pid: u32, binary: &Binary) -> Result<u64> {
    let first = discover::maps(pid)?
        .into_iter()
        .find(|map| map.inode == binary.id.ino && map.offset == 0);
    if let Some(map) = first {
        let link = binary.interpreter.first_load_vaddr & !0xfff;
        return Ok(map.address.0.wrapping_sub(link));
    }
    Err(anyhow!("{} is not mapped in {pid}", binary.display_path))
}
