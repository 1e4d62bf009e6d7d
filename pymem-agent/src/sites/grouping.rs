//! Sites from symbolised stacks: bytes grouped by the Python line that
//! allocated them.
use std::{borrow::Cow, collections::HashMap};

use serde::{Deserialize, Serialize};

use super::StackBytes;
use crate::cpython::Frame;

/// One line of Python that allocated memory, innermost frame of its
/// stacks; `stack` is the heaviest full stack through it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Site {
    pub function: String,
    pub file: String,
    pub line: i64,
    /// Bytes allocated here and still live (estimated from samples).
    pub bytes: u64,
    /// Bytes allocated here since observation started.
    pub allocated_bytes: u64,
    pub stack: Vec<Frame>,
    /// Attributed by heap state: the holder this line fills (a root of the
    /// object census, `__main__.CACHE`), whose retained bytes are `bytes`
    /// (shared evenly when several lines fill it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// How the line fills it: `CACHE[key] =`, `VISITORS.append()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Allocated while a module was being imported (its stack runs
    /// through the import machinery).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub import_time: bool,
}

impl Site {
    /// Its stack, innermost frame first; a stack-less site (from an old
    /// snapshot) is its own frame.
    pub fn frames(&self) -> Cow<'_, [Frame]> {
        if self.stack.is_empty() {
            Cow::Owned(vec![Frame {
                function: self.function.clone(),
                file: self.file.clone(),
                line: self.line,
            }])
        } else {
            Cow::Borrowed(&self.stack)
        }
    }
}

#[cfg(test)]
impl Site {
    /// The site of `stack`'s innermost frame, for tests.
    pub fn of_stack(stack: Vec<Frame>, bytes: u64, allocated_bytes: u64) -> Self {
        Self {
            function: stack[0].function.clone(),
            file: stack[0].file.clone(),
            line: stack[0].line,
            bytes,
            allocated_bytes,
            stack,
            ..Default::default()
        }
    }
}

/// `file:line`, or `<unknown>:0` (as tracemalloc writes it) for memory
/// allocated with no Python frame on the stack.
pub fn location(file: &str, line: i64) -> String {
    if file.is_empty() {
        "<unknown>:0".to_string()
    } else {
        format!("{file}:{line}")
    }
}

/// Groups symbolised stacks by their innermost frame, heaviest first.
pub fn group_sites(stacks: Vec<(Vec<Frame>, StackBytes)>) -> Vec<Site> {
    let mut by_line: HashMap<Frame, (StackBytes, Vec<Frame>, u64)> = HashMap::new();
    for (frames, bytes) in stacks {
        let Some(top) = frames.first().cloned() else {
            continue;
        };
        let entry = by_line
            .entry(top)
            .or_insert_with(|| (StackBytes::default(), Vec::new(), 0));
        entry.0.live += bytes.live;
        entry.0.allocated += bytes.allocated;
        let weight = bytes.live.max(bytes.allocated / 1024);
        if entry.1.is_empty() || weight > entry.2 {
            entry.1 = frames;
            entry.2 = weight;
        }
    }
    let mut sites: Vec<Site> = by_line
        .into_iter()
        .map(|(top, (bytes, stack, _))| Site {
            function: top.function,
            file: top.file,
            line: top.line,
            bytes: bytes.live,
            allocated_bytes: bytes.allocated,
            stack,
            ..Default::default()
        })
        .collect();
    sort_heaviest_first(&mut sites);
    sites
}

/// The order every site list is shown in: live bytes, then allocated bytes
/// (heaviest first), then `file:line`.
pub fn sort_heaviest_first(sites: &mut [Site]) {
    sites.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(b.allocated_bytes.cmp(&a.allocated_bytes))
            .then(a.file.cmp(&b.file))
            .then(a.line.cmp(&b.line))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_group_by_innermost_frame_and_sort_by_live_bytes() {
        let sites = group_sites(vec![
            (
                vec![Frame::in_app("churn", 5), Frame::in_app("main", 1)],
                StackBytes {
                    live: 0,
                    allocated: 900,
                },
            ),
            (
                vec![Frame::in_app("leak", 9), Frame::in_app("a", 2)],
                StackBytes {
                    live: 300,
                    allocated: 300,
                },
            ),
            (
                vec![Frame::in_app("leak", 9), Frame::in_app("b", 3)],
                StackBytes {
                    live: 500,
                    allocated: 500,
                },
            ),
        ]);
        assert_eq!(sites[0].function, "leak");
        assert_eq!(sites[0].bytes, 800);
        assert_eq!(sites[0].stack[1].function, "b", "heaviest stack kept");
        assert_eq!(sites[1].function, "churn");
        assert_eq!(sites[1].bytes, 0);
    }
}
