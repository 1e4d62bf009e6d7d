#![no_std]
// This library target exists so that pymem-agent can build-depend on this
// crate and be rebuilt when the eBPF programs change (see aya-build).
