#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| pymem_agent::fuzzing::elf_file(data));
