use super::*;
use crate::{
    cpython::Frame,
    model::HeapBreakdown,
    recording::{Checks, Sample, summary},
    sites::Site,
};

fn leaking_summary() -> RunSummary {
    let samples: Vec<Sample> = (0..30)
        .map(|i| {
            let arena = 10_000_000 + i * 1_000_000;
            Sample {
                t: i as f64 * 0.5,
                heap_bytes: arena + 2_000_000,
                heap: HeapBreakdown {
                    arena_bytes: arena,
                    raw_bytes: 2_000_000,
                    ..HeapBreakdown::default()
                },
                rss_bytes: arena + 9_000_000,
            }
        })
        .collect();
    let json = serde_json::json!({
        "pid": 7, "comm": "python", "cmdline": "python <leaky>.py", "python_version": "3.11.7",
        "binary": "/usr/bin/python3", "accounting": "probes", "heap_baseline": "observed",
        "first_seen_seconds": 0.0, "last_seen_seconds": 14.5, "peak_heap_bytes": 41_000_000,
        "peak_heap": HeapBreakdown::default(), "final_heap_bytes": 41_000_000,
        "final_heap": HeapBreakdown::default(), "peak_rss_bytes": 48_000_000, "final_rss_bytes": 48_000_000,
        "judged_from_seconds": 4.0, "judged_to_seconds": 14.5, "growth_bytes_per_second": 2e6,
        "growth_fit": 0.99,
        "verdict": {"kind": "leak", "leaking": true, "reason": "kept growing"},
        "growing_sites": [], "growing_types": [], "samples": samples,
    });
    let mut process: summary::ProcessOutcome = serde_json::from_value(json).unwrap();
    process.final_sites = vec![Site::of_stack(
        vec![Frame::in_app("leak", 6), Frame::in_app("<module>", 14)],
        30_000_000,
        30_000_000,
    )];
    RunSummary {
        target: "python <leaky>.py".into(),
        source: "embedded observer".into(),
        duration_seconds: 15.0,
        exit_status: Some(0),
        warmup: "25%".into(),
        checks: Checks::default(),
        failures: Vec::new(),
        processes: vec![process],
    }
}

#[test]
fn the_page_is_self_contained_and_escapes_what_it_shows() {
    let page = html(&leaking_summary());
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("default-src 'none'"));
    assert!(page.contains("python &lt;leaky&gt;.py"), "escaped target");
    assert!(!page.contains("<leaky>"));
    for fetch in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(!page.contains(fetch), "{fetch}");
    }
    assert!(page.contains("leak window"));
    assert!(page.contains("class=\"area src-arena\""));
    assert!(page.contains("class=\"rss-line\""));
}

#[test]
fn the_flame_graph_is_inlined_without_its_script_and_style() {
    let page = html(&leaking_summary());
    let flame = &page[page.find("<div class=\"flame\">").unwrap()..];
    let flame = &flame[..flame.find("</div>").unwrap()];
    assert!(flame.contains("leak (app.py:6)"), "{flame}");
    assert!(!flame.contains("<script"));
    assert!(!flame.contains("<style"));
    assert!(!flame.contains("onload="));
    assert!(!flame.contains("<?xml"));
    assert!(
        flame.starts_with("<div class=\"flame\"><svg version=\"1.1\" width=\"100%\""),
        "{}",
        &flame[..200]
    );
}
