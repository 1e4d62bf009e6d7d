//! Test results for the README's support table: one JSON file per case in
//! `target/support/`, rendered by `cargo xtask support-table`.
use std::path::PathBuf;

use serde_json::{Value, json};

use super::checks::Check;

/// `target/support/` (next to the tests' scratch directory, so it follows
/// CARGO_TARGET_DIR).
pub fn support_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("support")
}

/// What one case found, as written for the table.
pub struct CaseResult {
    pub id: String,
    /// The interpreter's own version, or `3.X` when it did not run.
    pub python: String,
    pub build: String,
    pub runs_as: String,
    /// Why the case did not run (the interpreter is absent, or unsupported).
    pub not_run: Option<String>,
    pub checks: Vec<Check>,
}

impl CaseResult {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "python": self.python,
            "build": self.build,
            "runs_as": self.runs_as,
            "not_run": self.not_run,
            "checks": self.checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        })
    }

    /// Writes `<group>-<id>.json`.
    pub fn write(&self, group: &str) {
        let dir = support_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{group}-{}.json", self.id));
        let text = serde_json::to_string_pretty(&self.to_json()).unwrap();
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.ok && c.expected)
            .map(|c| format!("{} ({}): {}: {}", self.id, self.python, c.feature, c.detail))
            .collect()
    }
}

/// Removes a group's results of an earlier run, so that cases no longer
/// run do not linger in the table.
pub fn clear_group(group: &str) {
    let Ok(entries) = std::fs::read_dir(support_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{group}-")) && name.ends_with(".json") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
