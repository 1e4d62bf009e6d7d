//! What each tool's own output says about the leak workload
//! (bench/peers/leak.py): did it name the process whose memory grew, the
//! line that leaks, the type it keeps, the variable that holds it? Every
//! answer is parsed from the tool's real output; a tool that has no such
//! output answers "n/a".
use std::{io::Read as _, time::Duration};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};

use super::super::{agent::RunningAgent, census};

/// The leak's ground truth.
pub struct Expected<'a> {
    /// The script's file name.
    pub file: &'a str,
    pub line: u32,
    /// What the workload kept, by its own `sys.getsizeof` count.
    pub kept_bytes: f64,
}

/// The leaking type and the variable that holds it (bench/peers/leak.py).
pub const LEAK_TYPE: &str = "SessionRecord";
pub const LEAK_VARIABLE: &str = "SESSIONS";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verdict {
    Yes,
    No,
    /// The tool has no output that could say it.
    NotOffered,
}

impl Verdict {
    fn of(found: bool) -> Self {
        if found { Verdict::Yes } else { Verdict::No }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Yes => "yes",
            Verdict::No => "no",
            Verdict::NotOffered => "n/a",
        }
    }
}

pub struct Found {
    pub process: Verdict,
    pub line: Verdict,
    pub type_: Verdict,
    pub variable: Verdict,
    /// What the tool's output said, briefly (its top entry).
    pub detail: String,
}

impl Found {
    pub fn summary(&self) -> String {
        format!(
            "process {}, line {}, type {}, variable {} ({})",
            self.process.as_str(),
            self.line.as_str(),
            self.type_.as_str(),
            self.variable.as_str(),
            self.detail
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "process": self.process.as_str(),
            "line": self.line.as_str(),
            "type": self.type_.as_str(),
            "variable": self.variable.as_str(),
            "detail": self.detail,
        })
    }
}

/// The 1-based number of the first line containing `marker`.
pub fn marked_line(source: &str, marker: &str) -> Option<u32> {
    source
        .lines()
        .position(|line| line.contains(marker))
        .and_then(|i| u32::try_from(i + 1).ok())
}

/// A frame names the leak's line.
fn is_leak_frame(file: &str, line: u64, leak: &Expected) -> bool {
    file.rsplit('/').next() == Some(leak.file) && line == u64::from(leak.line)
}

/// The tool saw the process's memory grow by at least half what it kept.
fn grew(bytes: f64, leak: &Expected) -> Verdict {
    Verdict::of(bytes >= leak.kept_bytes / 2.0)
}

/// Frames (file, line) of a JSON stack, innermost first.
fn frames(entry: &Value) -> Vec<(String, u64)> {
    entry["frames"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            (
                f["file"].as_str().unwrap_or_default().to_owned(),
                f["line"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn describe_top(entry: &Value, frames: &[(String, u64)]) -> String {
    match frames.first() {
        Some((file, line)) => format!(
            "top: {:.1} MiB at {}:{line}",
            entry["size"].as_f64().unwrap_or(0.0) / 1048576.0,
            file.rsplit('/').next().unwrap_or(file)
        ),
        None => "no allocations".to_owned(),
    }
}

/// The line verdict for stack-grouped output (tracemalloc, memray): the
/// heaviest stack passes through the leak's line.
fn stack_report(report: &Value, total: f64, leak: &Expected) -> Found {
    let top = &report["top"][0];
    let top_frames = frames(top);
    Found {
        process: grew(total, leak),
        line: Verdict::of(
            top_frames
                .iter()
                .any(|(file, line)| is_leak_frame(file, *line, leak)),
        ),
        type_: Verdict::NotOffered,
        variable: Verdict::NotOffered,
        detail: describe_top(top, &top_frames),
    }
}

/// bench/peers/tracemalloc_run.py's report: `snapshot.statistics("traceback")`.
pub fn tracemalloc(report: &str, leak: &Expected) -> Result<Found> {
    let report: Value = serde_json::from_str(report).context("tracemalloc report")?;
    let total = report["traced_bytes"]
        .as_f64()
        .context("tracemalloc report without traced_bytes")?;
    Ok(stack_report(&report, total, leak))
}

/// bench/peers/memray_leaks.py's answer: memray's leaked allocation records.
pub fn memray(output: &str, leak: &Expected) -> Result<Found> {
    let report: Value = serde_json::from_str(output.trim()).context("memray leaks report")?;
    let total = report["leaked_bytes"]
        .as_f64()
        .context("memray report without leaked_bytes")?;
    Ok(stack_report(&report, total, leak))
}

/// mprof's .dat: `MEM <MiB> <unix time>` lines (RSS samples) and the
/// command line. RSS names the process, nothing inside it.
pub fn mprof(dat: &str, leak: &Expected) -> Found {
    let samples: Vec<f64> = dat
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == "MEM").then_some(())?;
            fields.next()?.parse().ok()
        })
        .collect();
    let growth = match (samples.first(), samples.iter().copied().reduce(f64::max)) {
        (Some(first), Some(max)) => (max - first) * 1048576.0,
        _ => 0.0,
    };
    Found {
        process: grew(growth, leak),
        line: Verdict::NotOffered,
        type_: Verdict::NotOffered,
        variable: Verdict::NotOffered,
        detail: format!(
            "RSS +{:.1} MiB over {} samples",
            growth / 1048576.0,
            samples.len()
        ),
    }
}

/// ddtrace's pprof file: the heap-space samples (live heap, sampled),
/// heaviest stack first.
pub fn ddtrace(file: &[u8], leak: &Expected) -> Result<Found> {
    let profile = pprof::Profile::parse(&decompress(file)?)?;
    let heap = profile
        .sample_type_index("heap-space")
        .context("ddtrace profile without heap-space samples")?;
    let total: i64 = profile.samples.iter().map(|s| s.value(heap)).sum();
    let top = profile.samples.iter().max_by_key(|s| s.value(heap));
    let (line, detail) = match top {
        Some(sample) => {
            let stack = profile.stack(sample);
            let named = stack
                .iter()
                .any(|(_, file, line)| is_leak_frame(file, *line, leak));
            let detail = match stack.first() {
                Some((function, file, line)) => format!(
                    "top: {:.1} MiB at {}:{line} ({function})",
                    sample.value(heap) as f64 / 1048576.0,
                    file.rsplit('/').next().unwrap_or(file)
                ),
                None => "top sample without frames".to_owned(),
            };
            (Verdict::of(named), detail)
        }
        None => (Verdict::No, "no heap samples".to_owned()),
    };
    Ok(Found {
        process: grew(total as f64, leak),
        line,
        type_: Verdict::NotOffered,
        variable: Verdict::NotOffered,
        detail,
    })
}

/// pprof files come raw, gzip'd or zstd'd depending on the writer.
fn decompress(file: &[u8]) -> Result<Vec<u8>> {
    if file.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(file).read_to_end(&mut out)?;
        return Ok(out);
    }
    ensure!(
        !file.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]),
        "zstd-compressed pprof: not supported"
    );
    Ok(file.to_vec())
}

/// pymem, asked through its API while the process runs: the process's
/// growth, its sites (the heaviest line by heap state), its census types
/// and its holders.
pub fn pymem(agent: &RunningAgent, pid: u32, kept_bytes: f64, leak_line: u32) -> Found {
    let leak = Expected {
        file: "leak.py",
        line: leak_line,
        kept_bytes,
    };
    let get = |path: String| census::get(agent.addr(), &path);
    // The next snapshot, taken after the work ended.
    std::thread::sleep(Duration::from_millis(1500));
    let process = get("/api/v1/processes".into())
        .map(|list| {
            list.as_array()
                .into_iter()
                .flatten()
                .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
                .cloned()
                .unwrap_or(Value::Null)
        })
        .unwrap_or(Value::Null);
    let sites = get(format!("/api/v1/processes/{pid}/sites?report=1"));
    let types = get(format!("/api/v1/processes/{pid}/types?limit=3&max_age=60"));
    let holders = get(format!(
        "/api/v1/processes/{pid}/holders?limit=3&max_age=60"
    ));
    pymem_from_answers(&process, &sites, &types, &holders, &leak)
}

/// The verdicts from pymem's answers (pure, for the tests).
pub fn pymem_from_answers(
    process: &Value,
    sites: &Result<Value, String>,
    types: &Result<Value, String>,
    holders: &Result<Value, String>,
    leak: &Expected,
) -> Found {
    let growth = process["growth_bytes_per_second"].as_f64().unwrap_or(0.0);
    let heap = process["heap_bytes"].as_f64().unwrap_or(0.0);
    let suspected = process["leak_suspected"].as_bool().unwrap_or(false);
    let process_verdict =
        Verdict::of(suspected || (growth > 0.0 && grew(heap, leak) == Verdict::Yes));
    let mut detail = vec![format!(
        "leak_suspected {suspected}, growth {:.1} MiB/s",
        growth / 1048576.0
    )];
    let line = match sites {
        Ok(report) => {
            let top = &report["sites"][0];
            let file = top["file"].as_str().unwrap_or_default();
            let line = top["line"].as_u64().unwrap_or(0);
            detail.push(format!(
                "top site {}:{line}",
                file.rsplit('/').next().unwrap_or(file)
            ));
            Verdict::of(is_leak_frame(file, line, leak))
        }
        Err(e) => {
            detail.push(format!("sites: {e}"));
            Verdict::No
        }
    };
    let type_ = match types {
        Ok(list) => {
            let names: Vec<&str> = list
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["type"].as_str())
                .collect();
            detail.push(format!("top types {}", names.join(", ")));
            // Classes of __main__ are named as pymem qualifies them:
            // `__main__.SessionRecord`.
            Verdict::of(
                names
                    .iter()
                    .any(|name| name.rsplit('.').next() == Some(LEAK_TYPE)),
            )
        }
        Err(e) => {
            detail.push(format!("types: {e}"));
            Verdict::No
        }
    };
    let variable = match holders {
        Ok(list) => {
            let top = list[0]["name"].as_str().unwrap_or_default();
            detail.push(format!("top holder {top}"));
            Verdict::of(top.rsplit('.').next() == Some(LEAK_VARIABLE))
        }
        Err(e) => {
            detail.push(format!("holders: {e}"));
            Verdict::No
        }
    };
    Found {
        process: process_verdict,
        line,
        type_,
        variable,
        detail: detail.join("; "),
    }
}

/// Just enough of pprof's profile.proto to read samples and their stacks.
mod pprof {
    use anyhow::{Context as _, Result, bail};

    #[derive(Default)]
    pub struct Profile {
        /// (type, unit) string indices.
        sample_types: Vec<(i64, i64)>,
        pub samples: Vec<Sample>,
        /// id → line entries (function id, line), innermost first.
        locations: Vec<(u64, Vec<(u64, i64)>)>,
        /// id → (name, filename) string indices.
        functions: Vec<(u64, i64, i64)>,
        strings: Vec<String>,
    }

    pub struct Sample {
        location_ids: Vec<u64>,
        values: Vec<i64>,
    }

    impl Sample {
        pub fn value(&self, index: usize) -> i64 {
            self.values.get(index).copied().unwrap_or(0)
        }
    }

    impl Profile {
        pub fn parse(bytes: &[u8]) -> Result<Self> {
            let mut profile = Profile::default();
            for field in Fields(bytes) {
                let (number, value) = field?;
                match (number, value) {
                    (1, Value::Bytes(b)) => {
                        let mut pair = (0, 0);
                        for f in Fields(b) {
                            match f? {
                                (1, Value::Varint(v)) => pair.0 = v as i64,
                                (2, Value::Varint(v)) => pair.1 = v as i64,
                                _ => {}
                            }
                        }
                        profile.sample_types.push(pair);
                    }
                    (2, Value::Bytes(b)) => {
                        let mut sample = Sample {
                            location_ids: Vec::new(),
                            values: Vec::new(),
                        };
                        for f in Fields(b) {
                            match f? {
                                (1, Value::Varint(v)) => sample.location_ids.push(v),
                                (1, Value::Bytes(p)) => sample.location_ids.extend(packed(p)?),
                                (2, Value::Varint(v)) => sample.values.push(v as i64),
                                (2, Value::Bytes(p)) => sample
                                    .values
                                    .extend(packed(p)?.into_iter().map(|v| v as i64)),
                                _ => {}
                            }
                        }
                        profile.samples.push(sample);
                    }
                    (4, Value::Bytes(b)) => {
                        let (mut id, mut lines) = (0, Vec::new());
                        for f in Fields(b) {
                            match f? {
                                (1, Value::Varint(v)) => id = v,
                                (4, Value::Bytes(l)) => {
                                    let mut line = (0, 0);
                                    for f in Fields(l) {
                                        match f? {
                                            (1, Value::Varint(v)) => line.0 = v,
                                            (2, Value::Varint(v)) => line.1 = v as i64,
                                            _ => {}
                                        }
                                    }
                                    lines.push(line);
                                }
                                _ => {}
                            }
                        }
                        profile.locations.push((id, lines));
                    }
                    (5, Value::Bytes(b)) => {
                        let mut function = (0, 0, 0);
                        for f in Fields(b) {
                            match f? {
                                (1, Value::Varint(v)) => function.0 = v,
                                (2, Value::Varint(v)) => function.1 = v as i64,
                                (4, Value::Varint(v)) => function.2 = v as i64,
                                _ => {}
                            }
                        }
                        profile.functions.push(function);
                    }
                    (6, Value::Bytes(b)) => profile
                        .strings
                        .push(String::from_utf8_lossy(b).into_owned()),
                    _ => {}
                }
            }
            Ok(profile)
        }

        fn string(&self, index: i64) -> &str {
            usize::try_from(index)
                .ok()
                .and_then(|i| self.strings.get(i))
                .map_or("", String::as_str)
        }

        pub fn sample_type_index(&self, name: &str) -> Option<usize> {
            self.sample_types
                .iter()
                .position(|(type_, _)| self.string(*type_) == name)
        }

        /// (function, file, line) of a sample, innermost first.
        pub fn stack(&self, sample: &Sample) -> Vec<(String, String, u64)> {
            let mut stack = Vec::new();
            for id in &sample.location_ids {
                let Some((_, lines)) = self.locations.iter().find(|(l, _)| l == id) else {
                    continue;
                };
                for (function_id, line) in lines {
                    let (name, file) = self
                        .functions
                        .iter()
                        .find(|(f, _, _)| f == function_id)
                        .map_or(("", ""), |(_, n, f)| (self.string(*n), self.string(*f)));
                    stack.push((name.to_owned(), file.to_owned(), *line as u64));
                }
            }
            stack
        }
    }

    enum Value<'a> {
        Varint(u64),
        Bytes(&'a [u8]),
        Fixed,
    }

    /// The fields of one protobuf message: (number, value).
    struct Fields<'a>(&'a [u8]);

    impl<'a> Iterator for Fields<'a> {
        type Item = Result<(u64, Value<'a>)>;

        fn next(&mut self) -> Option<Self::Item> {
            if self.0.is_empty() {
                return None;
            }
            Some(self.field())
        }
    }

    impl<'a> Fields<'a> {
        fn field(&mut self) -> Result<(u64, Value<'a>)> {
            let key = varint(&mut self.0)?;
            let value = match key & 7 {
                0 => Value::Varint(varint(&mut self.0)?),
                1 => {
                    self.skip(8)?;
                    Value::Fixed
                }
                2 => {
                    let len = usize::try_from(varint(&mut self.0)?)?;
                    let bytes = self.0.get(..len).context("truncated field")?;
                    self.0 = &self.0[len..];
                    Value::Bytes(bytes)
                }
                5 => {
                    self.skip(4)?;
                    Value::Fixed
                }
                wire => bail!("unsupported wire type {wire}"),
            };
            Ok((key >> 3, value))
        }

        fn skip(&mut self, n: usize) -> Result<()> {
            self.0 = self.0.get(n..).context("truncated field")?;
            Ok(())
        }
    }

    fn varint(bytes: &mut &[u8]) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = bytes.split_first().context("truncated varint")?;
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("varint too long")
    }

    fn packed(mut bytes: &[u8]) -> Result<Vec<u64>> {
        let mut values = Vec::new();
        while !bytes.is_empty() {
            values.push(varint(&mut bytes)?);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEAK: Expected = Expected {
        file: "leak.py",
        line: 30,
        kept_bytes: 10_000_000.0,
    };

    #[test]
    fn leak_line_is_found_by_its_marker() {
        assert_eq!(
            marked_line("a\nb\n    X[i] = 1  # LEAK\n", "# LEAK"),
            Some(3)
        );
        assert_eq!(marked_line("a\n", "# LEAK"), None);
    }

    #[test]
    fn pymem_names_qualified_types_and_globals() {
        let process =
            json!({"growth_bytes_per_second": 4.8e6, "heap_bytes": 4e7, "leak_suspected": false});
        let sites = Ok(json!({"sites": [{"file": "/w/bench/peers/leak.py", "line": 30}]}));
        let types =
            Ok(json!([{"type": "str"}, {"type": "tuple"}, {"type": "__main__.SessionRecord"}]));
        let holders = Ok(json!([{"name": "__main__.SESSIONS"}]));
        let found = pymem_from_answers(&process, &sites, &types, &holders, &LEAK);
        assert_eq!(
            (found.process, found.line, found.type_, found.variable),
            (Verdict::Yes, Verdict::Yes, Verdict::Yes, Verdict::Yes),
            "{}",
            found.detail
        );
        let other_types = Ok(json!([{"type": "str"}, {"type": "SessionRecordish"}]));
        let error: Result<Value, String> = Err("501".into());
        let found = pymem_from_answers(&Value::Null, &error, &other_types, &error, &LEAK);
        assert_eq!(
            (found.process, found.line, found.type_, found.variable),
            (Verdict::No, Verdict::No, Verdict::No, Verdict::No)
        );
    }

    #[test]
    fn mprof_names_only_the_process() {
        let dat = "CMDLINE python leak.py\nMEM 20.0 1.0\nMEM 25.5 1.1\nMEM 31.0 1.2\n";
        let found = mprof(dat, &LEAK);
        assert_eq!(found.process, Verdict::Yes, "{}", found.detail);
        assert_eq!(found.line, Verdict::NotOffered);
        let flat = mprof("MEM 20.0 1.0\nMEM 21.0 1.1\n", &LEAK);
        assert_eq!(flat.process, Verdict::No);
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;

    /// A profile ddtrace 4.16 wrote for bench/peers/leak.py (PEERS_SCALE
    /// 0.1, 30,000 records, 7.1 MB kept), decompressed.
    const DDTRACE_PROFILE: &[u8] = include_bytes!("fixtures/ddtrace-leak.pprof");

    #[test]
    fn ddtrace_profile_names_the_leaking_line() {
        let leak = Expected {
            file: "leak.py",
            line: 29,
            kept_bytes: 7_149_690.0,
        };
        let found = ddtrace(DDTRACE_PROFILE, &leak).unwrap();
        assert_eq!(found.line, Verdict::Yes, "{}", found.detail);
        assert_eq!(found.type_, Verdict::NotOffered);
        let elsewhere = Expected { line: 27, ..leak };
        assert_eq!(
            ddtrace(DDTRACE_PROFILE, &elsewhere).unwrap().line,
            Verdict::No
        );
        assert!(ddtrace(b"\x0a\xff", &leak).is_err());
    }
}

#[cfg(test)]
mod stack_fixture_tests {
    use super::*;

    /// bench/peers/leak.py at PEERS_SCALE 0.02 under tracemalloc_run.py 1
    /// (1.46 MB kept), and at 0.05 under `memray run` (3.5 MB kept) as
    /// memray_leaks.py reads it; mprof's .dat of a run at 0.05.
    const TRACEMALLOC: &str = include_str!("fixtures/tracemalloc-1-leak.json");
    const MEMRAY: &str = include_str!("fixtures/memray-leak.json");
    const MPROF: &str = include_str!("fixtures/mprof-leak.dat");

    fn leak(kept_bytes: f64) -> Expected<'static> {
        Expected {
            file: "leak.py",
            line: 29,
            kept_bytes,
        }
    }

    #[test]
    fn tracemalloc_names_the_line_only() {
        let found = tracemalloc(TRACEMALLOC, &leak(1_457_882.0)).unwrap();
        assert_eq!(
            (found.process, found.line, found.type_, found.variable),
            (
                Verdict::Yes,
                Verdict::Yes,
                Verdict::NotOffered,
                Verdict::NotOffered
            ),
            "{}",
            found.detail
        );
        let other = Expected {
            line: 26,
            ..leak(1_457_882.0)
        };
        assert_eq!(tracemalloc(TRACEMALLOC, &other).unwrap().line, Verdict::No);
        // More than it traced: not named.
        assert_eq!(
            tracemalloc(TRACEMALLOC, &leak(1e9)).unwrap().process,
            Verdict::No
        );
    }

    #[test]
    fn memray_without_python_allocators_blames_an_arena() {
        // Without --trace-python-allocators memray sees pymalloc's arenas,
        // charged to whichever line first needed one.
        let found = memray(MEMRAY, &leak(3_503_802.0)).unwrap();
        assert_eq!(found.process, Verdict::Yes, "{}", found.detail);
        assert_eq!(found.line, Verdict::No, "{}", found.detail);
        assert!(found.detail.contains("leak.py:26"), "{}", found.detail);
    }

    #[test]
    fn mprof_dat_from_a_real_run() {
        let found = mprof(MPROF, &leak(3_503_802.0));
        assert_eq!(found.process, Verdict::Yes, "{}", found.detail);
        assert_eq!(mprof(MPROF, &leak(1e9)).process, Verdict::No);
    }
}
