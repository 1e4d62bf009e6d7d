//! Grouping sites by the keys tracemalloc users know (`lineno`,
//! `traceback`, `filename`) plus `function` and `app`: the innermost
//! frame of the application's own code, outside the interpreter's standard
//! library, installed packages and the import machinery. Memory whose stack
//! runs through the import machinery is import-time memory and says so.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Site;
use crate::cpython::Frame;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// The innermost frame of the application's own code (the default).
    #[default]
    App,
    /// The innermost frame, whoever's it is.
    Lineno,
    /// The innermost frame's function.
    Function,
    /// The innermost frame's file.
    File,
    /// The whole stack.
    Traceback,
}

/// Whose code `file` is.
fn is_library(file: &str) -> bool {
    file.starts_with("<frozen ")
        || file.contains("/site-packages/")
        || file.contains("/dist-packages/")
        || is_stdlib(file)
}

/// `.../lib/python3.X/...` outside its site-packages (checked first).
fn is_stdlib(file: &str) -> bool {
    file.split('/')
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0] == "lib" && w[1].starts_with("python3."))
}

/// Whether `frames` run through the import machinery.
pub fn is_import_time(frames: &[Frame]) -> bool {
    frames
        .iter()
        .any(|f| f.file.starts_with("<frozen importlib."))
}

/// The frame a site with `frames` (innermost first) is filed under for
/// `key`, and the stack kept with it (the frames from that one outward).
fn key_frame(frames: Vec<Frame>, key: GroupBy) -> (Frame, Vec<Frame>) {
    let innermost = frames[0].clone();
    match key {
        GroupBy::App => match frames
            .iter()
            .position(|f| !is_library(&f.file) && f.line > 0)
        {
            Some(at) if at > 0 => (frames[at].clone(), frames[at..].to_vec()),
            _ => (innermost, frames),
        },
        GroupBy::Function => (
            Frame {
                line: 0,
                ..innermost
            },
            frames,
        ),
        GroupBy::File => (
            Frame {
                function: String::new(),
                line: 0,
                ..innermost
            },
            frames,
        ),
        GroupBy::Lineno | GroupBy::Traceback => (innermost, frames),
    }
}

/// `sites` regrouped by `key`, heaviest first. Each group keeps the stack,
/// holder and store of its heaviest member.
pub fn regroup(sites: &[Site], key: GroupBy) -> Vec<Site> {
    let mut groups: HashMap<(Frame, Vec<Frame>), (Site, u64)> = HashMap::new();
    for site in sites {
        let frames = site.frames().into_owned();
        // A site regrouped again (a snapshot's) may have lost its import
        // frames to the first grouping: it keeps its mark.
        let import_time = site.import_time || is_import_time(&frames);
        let (frame, stack) = key_frame(frames, key);
        let identity = match key {
            GroupBy::Traceback => (frame.clone(), stack.clone()),
            _ => (frame.clone(), Vec::new()),
        };
        let weight = site.bytes.max(site.allocated_bytes / 1024);
        let entry = groups.entry(identity).or_insert_with(|| {
            (
                Site {
                    function: frame.function.clone(),
                    file: frame.file.clone(),
                    line: frame.line,
                    stack: stack.clone(),
                    holder: site.holder.clone(),
                    store: site.store.clone(),
                    import_time,
                    ..Default::default()
                },
                weight,
            )
        });
        entry.0.bytes += site.bytes;
        entry.0.allocated_bytes += site.allocated_bytes;
        if weight > entry.1 {
            entry.1 = weight;
            entry.0.stack = stack;
            entry.0.holder = site.holder.clone();
            entry.0.store = site.store.clone();
            entry.0.import_time = import_time;
        }
    }
    let mut out: Vec<Site> = groups.into_values().map(|(site, _)| site).collect();
    super::grouping::sort_heaviest_first(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, file: &str, line: i64) -> Frame {
        Frame {
            function: function.into(),
            file: file.into(),
            line,
        }
    }

    fn sites() -> Vec<Site> {
        let lib = "/usr/lib/python3.11/json/decoder.py";
        let pkg = "/srv/venv/lib/python3.11/site-packages/flask/app.py";
        vec![
            Site::of_stack(
                vec![
                    frame("raw_decode", lib, 353),
                    frame("handle", "/srv/app.py", 34),
                    frame("dispatch", pkg, 880),
                ],
                600,
                600,
            ),
            Site::of_stack(vec![frame("handle", "/srv/app.py", 34)], 100, 100),
            Site::of_stack(
                vec![
                    frame(
                        "_compile_bytecode",
                        "<frozen importlib._bootstrap_external>",
                        729,
                    ),
                    frame("<module>", "/srv/app.py", 3),
                ],
                50,
                50,
            ),
            Site::of_stack(vec![frame("handle", "/srv/app.py", 40)], 10, 10),
        ]
    }

    #[test]
    fn app_grouping_files_library_frames_under_the_app_line_that_called_them() {
        let grouped = regroup(&sites(), GroupBy::App);
        let rows: Vec<(&str, i64, u64, bool)> = grouped
            .iter()
            .map(|s| (s.function.as_str(), s.line, s.bytes, s.import_time))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("handle", 34, 700, false),
                ("<module>", 3, 50, true),
                ("handle", 40, 10, false)
            ]
        );
        assert_eq!(
            grouped[0].stack[0].line, 34,
            "the stack starts at the app frame"
        );
        let again = regroup(&grouped, GroupBy::App);
        assert!(
            again.iter().any(|s| s.line == 3 && s.import_time),
            "regrouping keeps the import mark: {again:?}"
        );
    }

    #[test]
    fn other_keys_group_as_tracemalloc_does() {
        let lineno = regroup(&sites(), GroupBy::Lineno);
        assert_eq!(lineno[0].function, "raw_decode");
        assert_eq!(lineno.len(), 4);
        let function = regroup(&sites(), GroupBy::Function);
        let handle = function.iter().find(|s| s.function == "handle").unwrap();
        assert_eq!((handle.bytes, handle.line), (110, 0));
        let file = regroup(&sites(), GroupBy::File);
        assert_eq!(
            file.iter().find(|s| s.file == "/srv/app.py").unwrap().bytes,
            110
        );
        assert_eq!(regroup(&sites(), GroupBy::Traceback).len(), 4);
        assert!(is_library("/usr/lib/python3.11/json/decoder.py"));
        assert!(!is_library("/srv/app.py"));
        assert!(!is_library("/home/me/lib/python3-tools/app.py"));
    }
}
