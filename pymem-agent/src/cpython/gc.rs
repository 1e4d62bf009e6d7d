//! Where each CPython build lets the probes see its garbage collector:
//! the USDT probes `python:gc__start(int generation)` and
//! `python:gc__done(Py_ssize_t unreachable)` in builds configured
//! `--with-dtrace` (Debian's, Ubuntu's, Fedora's), else the entry and
//! return of the collector function in builds that keep their symbols.
use object::{Object as _, ObjectSymbol as _, read::elf::ElfFile64};
use pymem_common::{cookie, probe_arg};

use super::PyVersion;
use crate::discover::{
    elf::{ProbePoint, probe_point},
    usdt,
};

/// A probe of the collector: where, with which cookie, and the file offset
/// of the USDT semaphore the kernel must raise while it is attached (0:
/// none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcProbe {
    pub point: ProbePoint,
    pub cookie: u64,
    pub semaphore_offset: u64,
}

/// How the collector of one binary is seen, or why it is not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GcHooks {
    Found {
        /// `usdt` or the function's name.
        source: String,
        entries: Vec<GcProbe>,
        /// Return probes (the collector function's end).
        returns: Vec<GcProbe>,
    },
    Unavailable(String),
}

/// The collector function of builds with symbols, and where its generation
/// argument is: the second, `int generation`, of `collect` (3.9) and
/// `gc_collect_main` (3.10–3.12). It counts every collection, as
/// `gc.get_stats()` does, and returns the unreachable objects it found.
/// 3.8's is split into constant-propagated clones whose arguments moved;
/// 3.13's `gc_collect_main` is entered with "any generation" (-1) for
/// automatic collections and picks one inside; 3.14's incremental
/// collector has no single function.
fn collector_function(version: PyVersion) -> Option<&'static str> {
    match (version.major, version.minor) {
        (3, 9) => Some("collect"),
        (3, 10..=12) => Some("gc_collect_main"),
        _ => None,
    }
}

/// The collector probes of `elf`, a CPython `version` interpreter.
pub fn hooks(elf: &ElfFile64<'_, object::Endianness>, version: PyVersion) -> GcHooks {
    match usdt_hooks(elf) {
        Ok(Some(hooks)) => return hooks,
        Ok(None) => {}
        Err(why) => return GcHooks::Unavailable(why),
    }
    let Some(function) = collector_function(version) else {
        return GcHooks::Unavailable(format!(
            "no gc__start/gc__done USDT probes, and pymem knows no collector function for {version}"
        ));
    };
    let mut defined = elf
        .symbols()
        .filter(|s| s.is_definition() && s.name() == Ok(function));
    let (Some(symbol), None) = (defined.next(), defined.next()) else {
        return GcHooks::Unavailable(format!(
            "no gc__start/gc__done USDT probes, and no single {function} symbol (stripped build?)"
        ));
    };
    let Some(point) = probe_point(elf, symbol.address()) else {
        return GcHooks::Unavailable(format!("{function} is outside the text"));
    };
    let entry = probe_arg::encode(cookie::GC_START, probe_arg::reg::RSI, false, 4, true, 0);
    let done = probe_arg::encode(cookie::GC_DONE, probe_arg::reg::RAX, false, 8, true, 0);
    let probe = |cookie| GcProbe {
        point,
        cookie,
        semaphore_offset: 0,
    };
    GcHooks::Found {
        source: function.to_owned(),
        entries: vec![probe(entry)],
        returns: vec![probe(done)],
    }
}

/// Both USDT probes, every site of each; `None` when the build has none.
fn usdt_hooks(elf: &ElfFile64<'_, object::Endianness>) -> Result<Option<GcHooks>, String> {
    let mut entries = Vec::new();
    for probe in usdt::probes(elf) {
        let kind = match (probe.provider.as_str(), probe.name.as_str()) {
            ("python", "gc__start") => cookie::GC_START,
            ("python", "gc__done") => cookie::GC_DONE,
            _ => continue,
        };
        let spec = probe
            .arguments
            .first()
            .ok_or_else(|| format!("USDT probe python:{} has no argument", probe.name))?;
        let cookie = usdt::argument_cookie(kind, spec)
            .map_err(|e| format!("USDT probe python:{}: {}", probe.name, e.0))?;
        let point = probe_point(elf, probe.vaddr)
            .ok_or_else(|| format!("USDT probe python:{} is outside the text", probe.name))?;
        let semaphore_offset = match probe.semaphore_vaddr {
            0 => 0,
            at => usdt::file_offset(elf, at).ok_or_else(|| {
                format!(
                    "the semaphore of USDT probe python:{} is outside the file",
                    probe.name
                )
            })?,
        };
        entries.push(GcProbe {
            point,
            cookie,
            semaphore_offset,
        });
    }
    let has = |kind| entries.iter().any(|p| cookie::kind(p.cookie) == kind);
    if entries.is_empty() {
        return Ok(None);
    }
    if !(has(cookie::GC_START) && has(cookie::GC_DONE)) {
        return Err("only one of the gc__start/gc__done USDT probes is present".into());
    }
    Ok(Some(GcHooks::Found {
        source: "usdt".into(),
        entries,
        returns: Vec::new(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cpython::testing, discover::elf};

    /// `readelf -n` names each USDT site and semaphore by address; the
    /// hooks put a probe on every `gc__start`/`gc__done` site, each with
    /// its semaphore.
    #[test]
    fn debians_build_is_seen_through_its_usdt_probes() {
        let Some(path) = testing::debian_python_3_11() else {
            return;
        };
        let notes = std::process::Command::new("readelf")
            .arg("-n")
            .arg(&path)
            .output()
            .unwrap();
        let notes = String::from_utf8_lossy(&notes.stdout);
        let mut truth: Vec<(u64, u64)> = Vec::new();
        let mut lines = notes.lines();
        while let Some(line) = lines.next() {
            if line.trim() == "Name: gc__start" || line.trim() == "Name: gc__done" {
                let fields = lines.next().unwrap();
                let hex = |key: &str| {
                    let at = fields.find(key).unwrap() + key.len();
                    let text = fields[at..].trim_start();
                    let text = text.split([',', ' ']).next().unwrap();
                    u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap()
                };
                truth.push((hex("Location:"), hex("Semaphore:")));
            }
        }
        assert!(truth.len() >= 2, "{notes}");
        let interp = elf::analyze(&path, "python3.11").unwrap();
        let GcHooks::Found {
            source,
            entries,
            returns,
        } = interp.gc
        else {
            panic!("{:?}", interp.gc);
        };
        assert_eq!(source, "usdt");
        assert!(returns.is_empty());
        let mut found: Vec<u64> = entries.iter().map(|p| p.point.vaddr).collect();
        found.sort_unstable();
        let mut expected: Vec<u64> = truth.iter().map(|(at, _)| *at).collect();
        expected.sort_unstable();
        assert_eq!(found, expected);
        assert!(entries.iter().all(|p| p.semaphore_offset != 0));
    }

    /// pyenv builds keep their symbols: `nm` names the collector function.
    #[test]
    fn symbol_builds_are_seen_through_the_collector_function() {
        let mut checked = 0;
        for (lib, _) in testing::pyenv_libpythons_or_skip() {
            let interp = elf::analyze(&lib, &testing::file_name(&lib)).unwrap();
            let Some(function) = collector_function(interp.version) else {
                assert!(
                    matches!(interp.gc, GcHooks::Unavailable(_)),
                    "{:?}",
                    interp.gc
                );
                continue;
            };
            let nm = std::process::Command::new("nm").arg(&lib).output().unwrap();
            let nm = String::from_utf8_lossy(&nm.stdout);
            let address = nm
                .lines()
                .find_map(|line| {
                    let mut fields = line.split_whitespace();
                    let (address, kind, name) = (fields.next()?, fields.next()?, fields.next()?);
                    (kind.eq_ignore_ascii_case("t") && name == function)
                        .then(|| u64::from_str_radix(address, 16).unwrap())
                })
                .unwrap_or_else(|| panic!("nm finds no {function} in {}", lib.display()));
            let GcHooks::Found {
                source,
                entries,
                returns,
            } = &interp.gc
            else {
                panic!("{}: {:?}", lib.display(), interp.gc);
            };
            assert_eq!(source, function);
            assert_eq!(entries[0].point.vaddr, address);
            assert_eq!(returns[0].point.vaddr, address);
            checked += 1;
        }
        assert!(checked >= 3, "only {checked} pyenv interpreters checked");
    }
}
