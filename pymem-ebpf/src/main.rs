//! pymem's kernel programs.
//!
//! Data flows one way: probes update per-process counters in maps and send
//! low-frequency events (process lifecycle, arenas, budget overruns) through
//! the `EVENTS` ring buffer. High-frequency probes (libc allocations of the
//! interpreter, extension buffers) are attached per process and charged to a
//! hit budget; the agent detaches them when a process goes over it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod probes;
#[cfg(target_arch = "bpf")]
mod pystack;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
