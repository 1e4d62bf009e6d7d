//! Which CPython version an interpreter binary is: every place the binary
//! states it (`_Py_DebugOffsets`, `Py_Version`, the `Py_GetVersion` string,
//! the file name) must agree, since a wrong version means wrong arena sizes
//! and stack offsets.
use std::fmt;

use anyhow::{Context as _, Result, bail};
use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};

use super::{BinaryImage, debug_offsets::DebugOffsets};

/// A CPython version, from the binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyVersion {
    pub major: u8,
    pub minor: u8,
    pub micro: u8,
}

impl fmt::Display for PyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl PyVersion {
    /// pymalloc's arena size: 256 KiB up to 3.9, 1 MiB since 3.10.
    pub fn arena_size(&self) -> u64 {
        if (self.major, self.minor) >= (3, 10) {
            1 << 20
        } else {
            256 << 10
        }
    }

    /// From PY_VERSION_HEX (`0x030d05f0` is 3.13.5 final).
    pub(crate) fn from_hex(hex: u32) -> Self {
        Self {
            major: (hex >> 24) as u8,
            minor: (hex >> 16) as u8,
            micro: (hex >> 8) as u8,
        }
    }

    /// The versions pymem reads at all.
    pub fn is_supported(&self) -> bool {
        self.major == 3 && self.minor >= 6
    }
}

/// Free-threaded builds carry the `t` ABI flag in their file names
/// (`python3.13t`, `libpython3.13t.so`).
pub fn is_free_threaded(name_hint: &str) -> bool {
    let stem = name_hint.split(".so").next().unwrap_or(name_hint);
    (stem.starts_with("python3.") || stem.starts_with("libpython3.")) && stem.ends_with('t')
}

/// Every place a binary states its version. A wrong version means wrong
/// arena sizes and stack offsets, so they must all agree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VersionSources {
    /// `_Py_DebugOffsets.version` (3.13+).
    debug_offsets: Option<PyVersion>,
    /// The exported `Py_Version` (3.11+, PY_VERSION_HEX).
    py_version: Option<PyVersion>,
    /// The `PY_VERSION` string `Py_GetVersion` formats (every version).
    version_string: Option<PyVersion>,
    /// `python3.X` / `libpython3.X.so` in the file name: (major, minor).
    file_name: Option<(u8, u8)>,
}

impl VersionSources {
    /// The version when every source that exists agrees; the file name
    /// only says major.minor. Refuses (with all sources named) otherwise.
    fn settle(&self) -> Result<PyVersion> {
        let stated = [
            ("_Py_DebugOffsets", self.debug_offsets),
            ("Py_Version", self.py_version),
            ("the Py_GetVersion string", self.version_string),
        ];
        let Some(version) = stated.iter().find_map(|(_, v)| *v) else {
            bail!("no _Py_DebugOffsets, no Py_Version and no version string in Py_GetVersion");
        };
        let binary_agrees = stated.iter().all(|(_, v)| v.is_none_or(|v| v == version));
        let name_agrees = self
            .file_name
            .is_none_or(|minor| minor == (version.major, version.minor));
        if binary_agrees && name_agrees {
            return Ok(version);
        }
        let mut said: Vec<String> = stated
            .iter()
            .filter_map(|(source, v)| Some(format!("{source} says {}", (*v)?)))
            .collect();
        if let Some((major, minor)) = self.file_name {
            said.push(format!("the file name says {major}.{minor}"));
        }
        bail!(
            "version sources disagree ({}); not guessing, since a wrong version means wrong arena sizes and stack layouts",
            said.join(", ")
        )
    }
}

/// Reads every version source of the binary and settles on one.
pub fn read_version(
    image: &impl BinaryImage,
    debug_offsets: Option<DebugOffsets>,
    name_hint: &str,
) -> Result<PyVersion> {
    let py_version = image
        .symbol("Py_Version")
        .and_then(|addr| image.bytes_at(addr, 4))
        .map(|bytes| PyVersion::from_hex(u32::from_le_bytes(bytes.try_into().expect("4 bytes"))));
    let version_string = image
        .symbol("Py_GetVersion")
        .and_then(|addr| version_from_get_version(image, addr));
    let sources = VersionSources {
        debug_offsets: debug_offsets.map(|d| d.version),
        py_version,
        version_string,
        file_name: version_in_file_name(name_hint),
    };
    sources
        .settle()
        .with_context(|| format!("file {name_hint:?}"))
}

/// `python3.11`, `libpython3.13t.so.1.0`, `python3.9-dbg` -> (3, minor);
/// `python3`, `python` and other names say nothing.
fn version_in_file_name(name: &str) -> Option<(u8, u8)> {
    let rest = name
        .strip_prefix("libpython3.")
        .or_else(|| name.strip_prefix("python3."))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((3, digits.parse().ok()?))
}

/// Looks at the strings `Py_GetVersion` passes to its `snprintf` — RIP-
/// relative `lea`s in PIE/shared builds, absolute immediates (`mov $addr,
/// %ecx`) in non-PIE executables — and returns the first reading `3.X.Y`.
pub(crate) fn version_from_get_version(image: &impl BinaryImage, addr: u64) -> Option<PyVersion> {
    let code = image.bytes_at(addr, 128)?;
    let decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    for instr in decoder.into_iter().take(40) {
        let target = if instr.mnemonic() == Mnemonic::Lea && instr.memory_base() == Register::RIP {
            instr.ip_rel_memory_address()
        } else if instr.mnemonic() == Mnemonic::Mov
            && instr.op_count() == 2
            && matches!(
                instr.op1_kind(),
                OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64
            )
        {
            instr.immediate(1)
        } else {
            continue;
        };
        let Some(bytes) = image.bytes_at(target, 16) else {
            continue;
        };
        let text: String = bytes
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| b as char)
            .collect();
        if let Some(version) = parse_version(&text) {
            return Some(version);
        }
    }
    None
}

/// `3.8.18` (optionally followed by a tag such as `+` or `rc1`).
fn parse_version(text: &str) -> Option<PyVersion> {
    let mut parts = text.splitn(3, '.');
    let major: u8 = parts.next()?.parse().ok()?;
    let minor: u8 = parts.next()?.parse().ok()?;
    let micro_text = parts.next()?;
    let digits: String = micro_text
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let micro: u8 = digits.parse().ok()?;
    (major == 3).then_some(PyVersion {
        major,
        minor,
        micro,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cpython::testing, discover::elf};

    #[test]
    fn version_strings() {
        assert_eq!(
            parse_version("3.8.18"),
            Some(PyVersion {
                major: 3,
                minor: 8,
                micro: 18
            })
        );
        assert_eq!(parse_version("3.9.2+").map(|v| v.micro), Some(2));
        assert_eq!(parse_version("%.80s (%.80s) %.80s"), None);
    }

    fn v(major: u8, minor: u8, micro: u8) -> PyVersion {
        PyVersion {
            major,
            minor,
            micro,
        }
    }

    #[test]
    fn version_sources_must_agree() {
        let agreeing = VersionSources {
            debug_offsets: Some(v(3, 13, 5)),
            py_version: Some(v(3, 13, 5)),
            version_string: Some(v(3, 13, 5)),
            file_name: Some((3, 13)),
        };
        assert_eq!(agreeing.settle().unwrap(), v(3, 13, 5));
        let only_string = VersionSources {
            version_string: Some(v(3, 8, 18)),
            ..Default::default()
        };
        assert_eq!(only_string.settle().unwrap(), v(3, 8, 18));
        let renamed = VersionSources {
            file_name: Some((3, 11)),
            ..agreeing
        };
        let err = renamed.settle().unwrap_err().to_string();
        assert!(err.contains("disagree"), "{err}");
        assert!(err.contains("file name says 3.11"), "{err}");
        let patched = VersionSources {
            debug_offsets: Some(v(3, 12, 1)),
            ..agreeing
        };
        let err = patched.settle().unwrap_err().to_string();
        assert!(err.contains("_Py_DebugOffsets says 3.12.1"), "{err}");
        assert!(VersionSources::default().settle().is_err());
    }

    #[test]
    fn version_in_file_names() {
        assert_eq!(version_in_file_name("python3.11"), Some((3, 11)));
        assert_eq!(version_in_file_name("libpython3.13t.so.1.0"), Some((3, 13)));
        assert_eq!(version_in_file_name("python3.9-dbg"), Some((3, 9)));
        assert_eq!(version_in_file_name("python3"), None);
        assert_eq!(version_in_file_name("python"), None);
        assert_eq!(version_in_file_name("uwsgi"), None);
    }

    #[test]
    fn free_threaded_names() {
        assert!(is_free_threaded("python3.13t"));
        assert!(is_free_threaded("libpython3.14t.so.1.0"));
        assert!(!is_free_threaded("python3.11"));
        assert!(!is_free_threaded("libpython3.11.so.1.0"));
        assert!(!is_free_threaded("python3"));
    }

    /// A renamed binary: the file name claims one version, the binary says
    /// another.
    #[test]
    fn refuses_a_binary_named_for_another_version() {
        let Some(path) = testing::debian_python_3_11() else {
            return;
        };
        let err = elf::analyze(&path, "python3.10").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("file name says 3.10"), "{text}");
        assert!(text.contains("Py_Version says 3.11"), "{text}");
    }
}
