//! `cargo xtask support-table`: renders the results the interpreter-matrix
//! tests wrote to `target/support/*.json` as the README's support table,
//! between its `<!-- support-table:start -->` and `:end -->` markers. The
//! table only ever says what a test run measured.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::workspace;

const START: &str = "<!-- support-table:start -->";
const END: &str = "<!-- support-table:end -->";

/// Feature columns, in the order a reader wants them; features a run did
/// not check for some row show as "–".
const FEATURES: [(&str, &str); 7] = [
    ("heap: small objects", "small objects"),
    ("heap: 8 KiB blocks", "large blocks"),
    ("numpy buffers", "numpy buffers"),
    ("churn not a leak", "churn ≠ leak"),
    ("allocation sites", "allocation sites"),
    ("version", "version"),
    ("PID namespace", "host + ns PID"),
];

/// Rewrites the README's table from target/support/; prints what it did.
pub fn run() -> Result<()> {
    let dir = workspace::target_dir().join("support");
    let results = read_results(&dir)?;
    if results.is_empty() {
        bail!(
            "no results in {}: run the matrix tests first (cargo xtask test)",
            dir.display()
        );
    }
    let readme = workspace::root().join("README.md");
    let table = render(&results);
    replace_section(&readme, &table)?;
    println!(
        "support table: {} cases from {} into {}",
        results.len(),
        dir.display(),
        readme.display()
    );
    Ok(())
}

/// Every `*.json` result, ordered by Python version, then case id.
fn read_results(dir: &Path) -> Result<Vec<Value>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut results = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = fs::read_to_string(&path)?;
            let value: Value =
                serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
            results.push(value);
        }
    }
    results.sort_by_key(|r| (version_key(text(r, "python")), text(r, "id").to_string()));
    Ok(results)
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or("")
}

/// "3.10.13" sorts after "3.9.18".
fn version_key(version: &str) -> Vec<u32> {
    version
        .split('.')
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap_or(0)
        })
        .collect()
}

fn render(results: &[Value]) -> String {
    let mut out = String::new();
    out.push_str("| Python | build | runs as |");
    for (_, title) in FEATURES {
        out.push_str(&format!(" {title} |"));
    }
    out.push_str("\n|---|---|---|");
    out.push_str(&"---|".repeat(FEATURES.len()));
    out.push('\n');
    for result in results {
        out.push_str(&render_row(result));
        out.push('\n');
    }
    out.push_str(
        "\n✅ works; for heap figures, the error against the interpreter's own ground truth \
         (`sys._debugmallocstats()` arena counts, exact object sizes, numpy `nbytes`) over \
         30–50 MB leaked. ❌ failed (the tests fail). ⛔ not supported on this build yet. \
         – not checked (e.g. numpy is not installed for that interpreter).\n",
    );
    out
}

fn render_row(result: &Value) -> String {
    let checks = result["checks"].as_array().cloned().unwrap_or_default();
    let mut runs_as = match result["not_run"].as_str() {
        Some(reason) => format!("not run: {reason}"),
        None => text(result, "runs_as").to_string(),
    };
    // A case that broke off (no column of its own) says why here.
    for check in checks.iter().filter(|c| c["ok"] == false) {
        if !FEATURES
            .iter()
            .any(|(feature, _)| check["feature"] == *feature)
        {
            runs_as += &format!(" {}", render_cell(check));
        }
    }
    let mut row = format!(
        "| {} | {} | {} |",
        text(result, "python"),
        text(result, "build"),
        runs_as
    );
    for (feature, _) in FEATURES {
        let cell = checks
            .iter()
            .find(|c| c["feature"] == feature)
            .map_or_else(|| "–".to_string(), render_cell);
        row.push_str(&format!(" {cell} |"));
    }
    row
}

/// ✅ with the error for ground-truth checks ("+0.5% of 49.3 MB …"), ❌
/// with the reason, ⛔ where the feature is not expected on this build.
fn render_cell(check: &Value) -> String {
    let detail = text(check, "detail").replace('|', "/");
    let ok = check["ok"] == true;
    let expected = check["expected"] != false;
    let error = detail
        .split_whitespace()
        .next()
        .filter(|word| word.ends_with('%'));
    match (ok, expected, error) {
        // Rounding gives "-0.0%" for a hair under: both are exact.
        (true, _, Some("+0.0%" | "-0.0%")) => "✅ ±0.0%".into(),
        (true, _, Some(error)) => format!("✅ {error}"),
        (true, _, None) => "✅".into(),
        (false, false, _) => "⛔".into(),
        (false, true, _) => format!("❌ {detail}"),
    }
}

/// Replaces the text between the markers; creates README.md with just a
/// heading and the markers when there is none.
fn replace_section(readme: &Path, table: &str) -> Result<()> {
    replace_between(readme, "Supported interpreters", START, END, table)
}

/// Replaces the text between `start` and `end` in `readme`; creates it with
/// just `heading` and the markers when there is none. Shared with the
/// benchmarks' README section (`cargo xtask perf-table`).
pub fn replace_between(
    readme: &Path,
    heading: &str,
    start_marker: &str,
    end_marker: &str,
    table: &str,
) -> Result<()> {
    let current = match fs::read_to_string(readme) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("# pymem\n\n## {heading}\n\n{start_marker}\n{end_marker}\n")
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", readme.display())),
    };
    let (Some(start), Some(end)) = (current.find(start_marker), current.find(end_marker)) else {
        bail!(
            "{} has no {start_marker} … {end_marker} markers",
            readme.display()
        );
    };
    if end < start {
        bail!(
            "{}: {end_marker} comes before {start_marker}",
            readme.display()
        );
    }
    let updated = format!(
        "{}{start_marker}\n{table}{}",
        &current[..start],
        &current[end..]
    );
    if updated != current {
        fs::write(readme, updated).with_context(|| format!("writing {}", readme.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions_sort_numerically() {
        assert!(version_key("3.9.18") < version_key("3.10.13"));
        assert!(version_key("3.13") < version_key("3.13.5"));
    }

    #[test]
    fn cells_say_what_was_measured() {
        let passed = json!({"feature": "heap: small objects", "ok": true, "expected": true,
            "detail": "+0.5% of 44.6 MB (measured 44.8 MB)"});
        assert_eq!(render_cell(&passed), "✅ +0.5%");
        let failed = json!({"feature": "version", "ok": false, "expected": true,
            "detail": "reported \"3.9.1\" | x"});
        assert_eq!(render_cell(&failed), "❌ reported \"3.9.1\" / x");
        let unsupported = json!({"feature": "allocation sites", "ok": false, "expected": false,
            "detail": "no sites"});
        assert_eq!(render_cell(&unsupported), "⛔");
    }

    #[test]
    fn only_the_marked_section_changes() {
        let dir = std::env::temp_dir().join(format!("pymem-support-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let readme = dir.join("README.md");
        fs::write(&readme, format!("intro\n{START}\nold\n{END}\noutro\n")).unwrap();
        replace_section(&readme, "new\n").unwrap();
        assert_eq!(
            fs::read_to_string(&readme).unwrap(),
            format!("intro\n{START}\nnew\n{END}\noutro\n")
        );
        fs::remove_file(&readme).unwrap();
        replace_section(&readme, "table\n").unwrap();
        let created = fs::read_to_string(&readme).unwrap();
        assert!(
            created.contains(&format!("{START}\ntable\n{END}")),
            "{created}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
