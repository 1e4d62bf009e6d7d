//! USDT (SystemTap SDT) probes of an ELF file: the `.note.stapsdt` notes,
//! each naming a provider and probe, its address, its semaphore and how its
//! arguments are found (`-4@112(%rsp)`, `-8@%r12`). Generic ELF knowledge;
//! which probes matter for CPython is in `cpython::gc`.
use object::{
    Object as _, ObjectSection as _, ObjectSegment as _,
    read::elf::{ElfFile64, SectionHeader as _},
};
use pymem_common::probe_arg;

/// One USDT probe site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtProbe {
    pub provider: String,
    pub name: String,
    /// Link address of the probe's `nop`.
    pub vaddr: u64,
    /// Link address of its semaphore (0: none): probes with one run only
    /// while the semaphore is non-zero.
    pub semaphore_vaddr: u64,
    /// The argument specifications, as written by the compiler.
    pub arguments: Vec<String>,
}

const NT_STAPSDT: u32 = 3;
/// Longest provider, name or argument string accepted.
const MAX_FIELD: usize = 256;
/// Most notes read from one file.
const MAX_PROBES: usize = 4096;

/// Every USDT probe of the file, adjusted for prelinking (`.stapsdt.base`
/// moved since the notes were written). Malformed notes are skipped.
pub fn probes(elf: &ElfFile64<'_, object::Endianness>) -> Vec<UsdtProbe> {
    let endian = elf.endian();
    let data = elf.data();
    let actual_base = elf
        .section_by_name(".stapsdt.base")
        .map(|section| section.address());
    let mut found = Vec::new();
    for header in elf.elf_section_table().iter() {
        let Ok(Some(mut notes)) = header.notes(endian, data) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if found.len() >= MAX_PROBES {
                return found;
            }
            if note.name() != b"stapsdt" || note.n_type(endian) != NT_STAPSDT {
                continue;
            }
            if let Some(probe) = parse_note(note.desc(), actual_base) {
                found.push(probe);
            }
        }
    }
    found
}

pub(crate) fn parse_note(desc: &[u8], actual_base: Option<u64>) -> Option<UsdtProbe> {
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            desc.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    let (pc, base, semaphore) = (word(0)?, word(1)?, word(2)?);
    let mut strings = desc
        .get(24..)?
        .split(|&b| b == 0)
        .map(|s| (s.len() <= MAX_FIELD).then(|| String::from_utf8_lossy(s).into_owned()));
    let provider = strings.next()??;
    let name = strings.next()??;
    let arguments = strings.next().flatten().unwrap_or_default();
    let shift = actual_base.map_or(0, |actual| actual.wrapping_sub(base));
    Some(UsdtProbe {
        provider,
        name,
        vaddr: pc.wrapping_add(shift),
        semaphore_vaddr: if semaphore == 0 {
            0
        } else {
            semaphore.wrapping_add(shift)
        },
        arguments: arguments.split_whitespace().map(str::to_owned).collect(),
    })
}

/// The file offset of a link address inside a loadable segment's file
/// bytes (where a semaphore lives, for the kernel's reference counter).
pub fn file_offset(elf: &ElfFile64<'_, object::Endianness>, vaddr: u64) -> Option<u64> {
    elf.segments().find_map(|segment| {
        let (offset, size) = segment.file_range();
        let start = segment.address();
        // The program headers are the file's word: the sum may not fit.
        (vaddr >= start && vaddr - start < size)
            .then(|| (vaddr - start).checked_add(offset))
            .flatten()
    })
}

/// Why an argument specification cannot be read by the probes.
#[derive(Debug, PartialEq, Eq)]
pub struct UnreadableArgument(pub String);

/// The attach cookie of probe `kind` reading the argument `spec`
/// (`-4@112(%rsp)`, `8@%rax`, `-4@$2`): x86-64 general-purpose registers,
/// register-relative memory and constants.
pub fn argument_cookie(kind: u64, spec: &str) -> Result<u64, UnreadableArgument> {
    let bad = |why: &str| UnreadableArgument(format!("{spec:?}: {why}"));
    let (size, operand) = spec.split_once('@').ok_or_else(|| bad("no size@"))?;
    let size: i64 = size.parse().map_err(|_| bad("size is not a number"))?;
    let signed = size < 0;
    let bytes = size.unsigned_abs();
    if !matches!(bytes, 1 | 2 | 4 | 8) {
        return Err(bad("size is not 1, 2, 4 or 8"));
    }
    if let Some(constant) = operand.strip_prefix('$') {
        let value: i32 = constant.parse().map_err(|_| bad("constant out of range"))?;
        return Ok(probe_arg::encode(
            kind,
            probe_arg::reg::NONE,
            false,
            bytes,
            signed,
            value,
        ));
    }
    if let Some(name) = operand.strip_prefix('%') {
        let register = register(name).ok_or_else(|| bad("unknown register"))?;
        return Ok(probe_arg::encode(kind, register, false, bytes, signed, 0));
    }
    let (displacement, rest) = operand
        .split_once('(')
        .ok_or_else(|| bad("unknown operand"))?;
    let name = rest
        .strip_suffix(')')
        .and_then(|r| r.strip_prefix('%'))
        .ok_or_else(|| bad("unknown memory operand"))?;
    let register = register(name).ok_or_else(|| bad("unsupported base register"))?;
    let displacement: i32 = if displacement.is_empty() {
        0
    } else {
        displacement
            .parse()
            .map_err(|_| bad("displacement out of range"))?
    };
    Ok(probe_arg::encode(
        kind,
        register,
        true,
        bytes,
        signed,
        displacement,
    ))
}

/// A general-purpose register by any of its names (`rax`, `eax`, `r12d`);
/// the probe reads the whole register and the size keeps the low bytes.
fn register(name: &str) -> Option<u64> {
    use probe_arg::reg;
    let legacy = [
        (["rax", "eax", "ax", "al"], reg::RAX),
        (["rbx", "ebx", "bx", "bl"], reg::RBX),
        (["rcx", "ecx", "cx", "cl"], reg::RCX),
        (["rdx", "edx", "dx", "dl"], reg::RDX),
        (["rsi", "esi", "si", "sil"], reg::RSI),
        (["rdi", "edi", "di", "dil"], reg::RDI),
        (["rbp", "ebp", "bp", "bpl"], reg::RBP),
        (["rsp", "esp", "sp", "spl"], reg::RSP),
    ];
    if let Some((_, id)) = legacy.iter().find(|(names, _)| names.contains(&name)) {
        return Some(*id);
    }
    let number: u64 = name
        .strip_prefix('r')?
        .trim_end_matches(['d', 'w', 'b'])
        .parse()
        .ok()?;
    (8..=15).contains(&number).then(|| reg::R8 + (number - 8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pymem_common::{cookie, probe_arg::reg};

    #[test]
    fn argument_specifications_of_debians_interpreters() {
        let at = argument_cookie(cookie::GC_START, "-4@112(%rsp)").unwrap();
        assert_eq!(cookie::kind(at), cookie::GC_START);
        assert_eq!(probe_arg::register(at), reg::RSP);
        assert!(probe_arg::is_memory(at) && probe_arg::is_signed(at));
        assert_eq!((probe_arg::size(at), probe_arg::displacement(at)), (4, 112));
        let below = argument_cookie(cookie::GC_START, "-4@-228(%rbp)").unwrap();
        assert_eq!(probe_arg::displacement(below), -228);
        let in_register = argument_cookie(cookie::GC_DONE, "-8@%r12").unwrap();
        assert_eq!(probe_arg::register(in_register), reg::R12);
        assert!(!probe_arg::is_memory(in_register));
        let low = argument_cookie(cookie::GC_DONE, "4@%r13d").unwrap();
        assert_eq!(probe_arg::register(low), reg::R13);
        assert_eq!(probe_arg::extend(low, 0xffff_ffff_0000_0005), 5);
        let signed = argument_cookie(cookie::GC_DONE, "-4@%eax").unwrap();
        assert_eq!(probe_arg::extend(signed, 0xffff_ffff), -1);
        let constant = argument_cookie(cookie::GC_START, "-4@$2").unwrap();
        assert_eq!(
            (
                probe_arg::register(constant),
                probe_arg::displacement(constant)
            ),
            (reg::NONE, 2)
        );
        for bad in [
            "",
            "4",
            "3@%rax",
            "4@%xmm0",
            "8@16(%rip)",
            "4@$99999999999",
            "x@%rax",
        ] {
            assert!(argument_cookie(cookie::GC_START, bad).is_err(), "{bad}");
        }
    }

    /// A segment whose file offset is near the top of the range: the
    /// semaphore's offset does not wrap.
    #[test]
    fn file_offsets_do_not_wrap() {
        let mut data = std::fs::read("/bin/ls").unwrap();
        let headers = u64::from_le_bytes(data[0x20..0x28].try_into().unwrap()) as usize;
        let count = u16::from_le_bytes(data[0x38..0x3a].try_into().unwrap()) as usize;
        let mut vaddrs = Vec::new();
        for index in 0..count {
            let at = headers + index * 56;
            data[at + 8..at + 16].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
            vaddrs.push(u64::from_le_bytes(
                data[at + 16..at + 24].try_into().unwrap(),
            ));
        }
        let elf = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
        for vaddr in vaddrs {
            assert_eq!(file_offset(&elf, vaddr + 16), None, "{vaddr:#x}");
        }
    }

    #[test]
    fn notes_that_do_not_parse_are_skipped() {
        assert_eq!(parse_note(&[0; 10], None), None);
        let mut desc = Vec::new();
        for word in [0x1000u64, 0x2000, 0x3000] {
            desc.extend(word.to_le_bytes());
        }
        desc.extend(b"python\0gc__start\0-4@%edi\0");
        let probe = parse_note(&desc, Some(0x2100)).unwrap();
        assert_eq!((probe.vaddr, probe.semaphore_vaddr), (0x1100, 0x3100));
        assert_eq!(probe.arguments, ["-4@%edi"]);
        desc.truncate(24 + 3);
        assert_eq!(parse_note(&desc, None), None, "no name");
    }
}
