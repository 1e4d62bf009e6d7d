use super::*;

const MIB: f64 = 1024.0 * 1024.0;

fn samples(heap: impl Fn(f64) -> f64) -> Vec<Sample> {
    (0..=40)
        .map(|i| {
            let t = i as f64 * 0.5;
            Sample {
                t,
                heap_bytes: heap(t) as u64,
                heap: HeapBreakdown::default(),
                rss_bytes: 0,
            }
        })
        .collect()
}

fn verdict_of(samples: &[Sample]) -> Verdict {
    let judged: Vec<&Sample> = samples.iter().collect();
    judge(&judged, &LeakPolicy::default()).1
}

#[test]
fn steady_growth_to_the_end_is_a_leak() {
    let v = verdict_of(&samples(|t| 50.0 * MIB + t * 2.0 * MIB));
    assert_eq!(v.kind, VerdictKind::Leak, "{v:?}");
    assert!(v.leaking);
}

#[test]
fn growth_that_levels_off_is_a_plateau() {
    let v = verdict_of(&samples(|t| 50.0 * MIB + t.min(12.0) * 3.0 * MIB));
    assert_eq!(v.kind, VerdictKind::Plateau, "{v:?}");
    assert!(!v.leaking);
}

#[test]
fn up_and_down_is_churn_and_little_growth_is_flat() {
    let sawtooth =
        samples(|t| 50.0 * MIB + ((t * 2.0) as u64 % 4) as f64 * 8.0 * MIB + t * 0.1 * MIB);
    let v = verdict_of(&sawtooth);
    assert!(
        matches!(v.kind, VerdictKind::Churn | VerdictKind::Flat),
        "{v:?}"
    );
    assert!(!v.leaking);
    let v = verdict_of(&samples(|t| 50.0 * MIB + t * 1000.0));
    assert_eq!(v.kind, VerdictKind::Flat, "{v:?}");
    let v = verdict_of(&samples(|t| 90.0 * MIB - t * MIB));
    assert_eq!(v.kind, VerdictKind::Flat, "{v:?}");
}

#[test]
fn a_few_samples_are_too_short_to_judge() {
    let v = verdict_of(&samples(|t| t * 10.0 * MIB)[..3]);
    assert_eq!(v.kind, VerdictKind::TooShort, "{v:?}");
    assert!(!v.leaking);
}

fn leaking_outcome() -> ProcessOutcome {
    ProcessOutcome {
        pid: 42,
        comm: "python".into(),
        cmdline: "python leaky.py".into(),
        python_version: "3.11.9".into(),
        binary: "/usr/bin/python3".into(),
        accounting: Accounting::Probes,
        heap_baseline: HeapBaseline::Observed,
        first_seen_seconds: 0.5,
        last_seen_seconds: 20.0,
        peak_heap_bytes: 60 << 20,
        peak_heap: HeapBreakdown::default(),
        final_heap_bytes: 60 << 20,
        final_heap: HeapBreakdown::default(),
        peak_rss_bytes: 70 << 20,
        final_rss_bytes: 70 << 20,
        judged_from_seconds: 5.0,
        judged_to_seconds: 20.0,
        growth_bytes_per_second: 2.0 * MIB,
        growth_fit: 0.99,
        verdict: Verdict {
            kind: VerdictKind::Leak,
            leaking: true,
            reason: "kept growing, 100%, for sure: yes".into(),
        },
        growing_sites: vec![
            SiteGrowth {
                function: "leak".into(),
                file: "/repo/app/leaky.py".into(),
                line: 7,
                growth_bytes: 30 << 20,
                bytes: 40 << 20,
                stack: Vec::new(),
            },
            SiteGrowth {
                function: "noise".into(),
                file: "/repo/app/leaky.py".into(),
                line: 9,
                growth_bytes: 1 << 10,
                bytes: 1 << 10,
                stack: Vec::new(),
            },
        ],
        growing_types: Vec::new(),
        types_note: None,
        samples: Vec::new(),
        final_sites: Vec::new(),
    }
}

#[test]
fn checks_fail_on_a_leak_a_peak_and_a_rate_over_their_limits() {
    let processes = [leaking_outcome()];
    assert!(failures(&processes, &Checks::default()).is_empty());
    let failed = failures(
        &processes,
        &Checks {
            fail_on_leak: true,
            max_heap_bytes: Some(50 << 20),
            max_growth_bytes_per_second: Some(MIB / 60.0),
        },
    );
    let checks: Vec<&str> = failed.iter().map(|f| f.check.as_str()).collect();
    assert_eq!(checks, ["leak", "max_heap", "max_growth"]);
    assert!(
        failed[0].reason.contains("leak (/repo/app/leaky.py:7"),
        "{}",
        failed[0].reason
    );
    let generous = Checks {
        fail_on_leak: false,
        max_heap_bytes: Some(1 << 30),
        max_growth_bytes_per_second: Some(10.0 * MIB),
    };
    assert!(failures(&processes, &generous).is_empty());
}

#[test]
fn annotations_point_at_the_leaking_lines_relative_to_the_checkout() {
    let processes = vec![leaking_outcome()];
    let checks = Checks {
        fail_on_leak: true,
        ..Checks::default()
    };
    let summary = RunSummary {
        target: "python leaky.py".into(),
        source: "embedded observer".into(),
        duration_seconds: 20.0,
        exit_status: Some(0),
        warmup: "25%".into(),
        checks,
        failures: failures(&processes, &checks),
        processes,
    };
    let text = github_annotations(&summary, std::path::Path::new("/repo"));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "the small site is not annotated: {text}");
    let line = lines[0];
    assert!(
        line.starts_with("::error file=app/leaky.py,line=7,title=pymem%3A memory leak::"),
        "{line}"
    );
    // The message is escaped: '%' but not ':' or ','.
    assert!(line.contains("100%25, for sure: yes"), "{line}");
    assert!(!line.contains('\n'));
}

#[test]
fn annotation_escapes() {
    assert_eq!(escape_data("a%b\r\nc"), "a%25b%0D%0Ac");
    assert_eq!(escape_property("a:b,c%"), "a%3Ab%2Cc%25");
}

#[test]
fn the_teardown_at_exit_is_left_out() {
    let mut run = samples(|t| 50.0 * MIB + t * 2.0 * MIB);
    let before = run.len();
    for heap in [30.0 * MIB, 4.0 * MIB] {
        let t = run.last().unwrap().t + 0.5;
        run.push(Sample {
            t,
            heap_bytes: heap as u64,
            heap: HeapBreakdown::default(),
            rss_bytes: 0,
        });
    }
    assert_eq!(without_teardown(&run).len(), before);
    let v = verdict_of(without_teardown(&run));
    assert_eq!(v.kind, VerdictKind::Leak, "{v:?}");
    let shrinking = samples(|t| 90.0 * MIB - t * MIB);
    assert_eq!(
        without_teardown(&shrinking).len(),
        shrinking.len() - TEARDOWN_SAMPLES
    );
}
