//! Allocation sites as a pprof profile: the gzip-compressed `profile.proto`
//! of github.com/google/pprof (readable by `go tool pprof`, Pyroscope,
//! Speedscope, ...).
//!
//! Two sample types, `inuse_space` (live bytes) and `alloc_space` (bytes
//! allocated since observation started), and one sample per site: its
//! heaviest stack, leaf first. Only the messages and fields pymem fills are
//! declared here, with the spec's tags; readers treat the rest as unset.
//! `Function.start_line` stays 0 (unknown): frames carry no first line.
use std::{collections::HashMap, io::Write as _};

use anyhow::{Context as _, Result};
use flate2::{Compression, write::GzEncoder};
use prost::Message as _;

use crate::{cpython::Frame, sites::Site};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
}

/// One pseudo-mapping for all Python code, marked as symbolised so that
/// readers neither look for a binary nor try to symbolise addresses.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// Builds the profile of `sites` taken at `time_nanos` (Unix epoch), with
/// free-form `comments` (process, Python version), gzip-compressed.
pub fn encode(sites: &[Site], time_nanos: i64, comments: &[String]) -> Result<Vec<u8>> {
    let profile = build(sites, time_nanos, comments);
    let mut gzip = GzEncoder::new(Vec::new(), Compression::default());
    gzip.write_all(&profile.encode_to_vec())
        .and_then(|()| gzip.finish())
        .context("compressing the profile")
}

/// The uncompressed profile.
pub fn build(sites: &[Site], time_nanos: i64, comments: &[String]) -> Profile {
    let mut builder = ProfileBuilder::default();
    builder.profile.time_nanos = time_nanos;
    // string_table[0] must be "".
    builder.string("");
    let inuse = builder.value_type("inuse_space", "bytes");
    builder.value_type("alloc_space", "bytes");
    builder.profile.default_sample_type = inuse.r#type;
    let comment = comments.iter().map(|c| builder.string(c)).collect();
    builder.profile.comment = comment;
    let python = builder.string("[python]");
    builder.profile.mapping.push(Mapping {
        id: PYTHON_MAPPING,
        filename: python,
        has_functions: true,
        has_filenames: true,
        has_line_numbers: true,
    });
    for site in sites {
        builder.add_site(site);
    }
    builder.profile
}

const PYTHON_MAPPING: u64 = 1;

#[derive(Default)]
struct ProfileBuilder {
    profile: Profile,
    strings: HashMap<String, i64>,
    /// (function name, file) -> Function.id
    functions: HashMap<(String, String), u64>,
    /// (Function.id, line) -> Location.id
    locations: HashMap<(u64, i64), u64>,
}

impl ProfileBuilder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&index) = self.strings.get(s) {
            return index;
        }
        let index = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), index);
        index
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> ValueType {
        let value_type = ValueType {
            r#type: self.string(kind),
            unit: self.string(unit),
        };
        self.profile.sample_type.push(value_type.clone());
        value_type
    }

    fn add_site(&mut self, site: &Site) {
        if site.bytes == 0 && site.allocated_bytes == 0 {
            return;
        }
        let location_id = site.frames().iter().map(|f| self.location(f)).collect();
        self.profile.sample.push(Sample {
            location_id,
            value: vec![
                saturating_i64(site.bytes),
                saturating_i64(site.allocated_bytes),
            ],
        });
    }

    fn location(&mut self, frame: &Frame) -> u64 {
        let function_id = self.function(frame);
        let key = (function_id, frame.line);
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(Location {
            id,
            mapping_id: PYTHON_MAPPING,
            line: vec![Line {
                function_id,
                line: frame.line,
            }],
        });
        self.locations.insert(key, id);
        id
    }

    fn function(&mut self, frame: &Frame) -> u64 {
        let key = (frame.function.clone(), frame.file.clone());
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let function = Function {
            id,
            name: self.string(&frame.function),
            filename: self.string(&frame.file),
            start_line: 0,
        };
        self.profile.function.push(function);
        self.functions.insert(key, id);
        id
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn shared_frames_share_locations_and_functions() {
        let sites = [
            Site::of_stack(
                vec![Frame::in_app("leak", 9), Frame::in_app("main", 30)],
                800,
                900,
            ),
            Site::of_stack(
                vec![Frame::in_app("churn", 5), Frame::in_app("main", 31)],
                0,
                4096,
            ),
            Site::of_stack(vec![Frame::in_app("idle", 2)], 0, 0),
        ];
        let profile = build(&sites, 7, &["pid 1".into()]);
        let text = |i: i64| profile.string_table[i as usize].as_str();
        assert_eq!(text(0), "");
        assert_eq!(profile.sample.len(), 2, "the empty site is left out");
        assert_eq!(profile.sample[0].value, vec![800, 900]);
        // main:30 and main:31 are two locations of one function.
        assert_eq!(profile.location.len(), 4);
        assert_eq!(profile.function.len(), 3);
        let leaf = &profile.location[profile.sample[0].location_id[0] as usize - 1];
        let function = &profile.function[leaf.line[0].function_id as usize - 1];
        assert_eq!((text(function.name), leaf.line[0].line), ("leak", 9));
        assert_eq!(text(profile.sample_type[1].r#type), "alloc_space");
        assert_eq!(text(profile.default_sample_type), "inuse_space");
        assert_eq!(text(profile.comment[0]), "pid 1");
    }

    #[test]
    fn encoded_profile_is_gzip_of_the_message() {
        let sites = [Site::of_stack(vec![Frame::in_app("leak", 9)], 1, 2)];
        let gz = encode(&sites, 7, &[]).unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(Profile::decode(&raw[..]).unwrap(), build(&sites, 7, &[]));
    }
}
