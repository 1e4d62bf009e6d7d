//! The report's two charts as inline SVG: the heap stacked by source, and
//! the RSS with the heap's total beside it; both mark the judged window.
use std::fmt::Write as _;

use super::escape;
use crate::{format, model::HeapBreakdown, recording::summary::ProcessOutcome};

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 30.0;

/// A source of the heap: CSS class suffix, name, its bytes.
type HeapSource = (&'static str, &'static str, fn(&HeapBreakdown) -> u64);

/// The sources, bottom up.
const SOURCES: [HeapSource; 5] = [
    ("before", "before attach", |h| h.before_attach_bytes),
    ("arena", "arena", |h| h.arena_bytes),
    ("raw", "raw", |h| h.raw_bytes),
    ("extension", "extension", |h| h.extension_bytes),
    ("syscall", "syscall", |h| h.syscall_bytes),
];

struct Frame {
    t0: f64,
    t1: f64,
    max: f64,
}

impl Frame {
    fn of(p: &ProcessOutcome, max: f64) -> Self {
        let t0 = p.samples.first().map_or(0.0, |s| s.t);
        let t1 = p.samples.last().map_or(1.0, |s| s.t).max(t0 + 1.0);
        Self {
            t0,
            t1,
            max: nice_ceiling(max.max(1024.0)),
        }
    }
    fn x(&self, t: f64) -> f64 {
        LEFT + (t - self.t0) / (self.t1 - self.t0) * (WIDTH - LEFT - RIGHT)
    }
    fn y(&self, bytes: f64) -> f64 {
        HEIGHT - BOTTOM - bytes / self.max * (HEIGHT - TOP - BOTTOM)
    }
}

/// The heap stacked by source, the judged window behind it.
pub fn heap(p: &ProcessOutcome, index: usize) -> String {
    let max = p
        .samples
        .iter()
        .map(|s| s.heap.total().max(s.heap_bytes))
        .max()
        .unwrap_or(0) as f64;
    let frame = Frame::of(p, max);
    let mut svg = open(&frame, index, "heap");
    window(&mut svg, &frame, p);
    let mut below = vec![0.0; p.samples.len()];
    let mut keys = Vec::new();
    for (class, name, bytes_of) in SOURCES {
        if p.samples.iter().all(|s| bytes_of(&s.heap) == 0) {
            continue;
        }
        keys.push((class, name));
        let above: Vec<f64> = p
            .samples
            .iter()
            .zip(&below)
            .map(|(s, b)| b + bytes_of(&s.heap) as f64)
            .collect();
        let mut points = String::new();
        for (s, top) in p.samples.iter().zip(&above) {
            let _ = write!(points, "{:.1},{:.1} ", frame.x(s.t), frame.y(*top));
        }
        for (s, bottom) in p.samples.iter().zip(&below).rev() {
            let _ = write!(points, "{:.1},{:.1} ", frame.x(s.t), frame.y(*bottom));
        }
        let _ = write!(
            svg,
            "<polygon class=\"area src-{class}\" points=\"{}\"><title>{name}</title></polygon>",
            points.trim_end()
        );
        below = above;
    }
    close(&mut svg);
    svg.push_str(&legend(keys.iter().map(|(c, n)| (*c, *n))));
    svg
}

/// The RSS as a line, the heap's total dashed, the judged window behind.
pub fn rss(p: &ProcessOutcome, index: usize) -> String {
    let max = p
        .samples
        .iter()
        .map(|s| s.rss_bytes.max(s.heap_bytes))
        .max()
        .unwrap_or(0) as f64;
    let frame = Frame::of(p, max);
    let mut svg = open(&frame, index, "rss");
    window(&mut svg, &frame, p);
    let line = |value: fn(&crate::recording::Sample) -> u64| {
        p.samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", frame.x(s.t), frame.y(value(s) as f64)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = write!(
        svg,
        "<polyline class=\"heap-line\" points=\"{}\"><title>heap</title></polyline><polyline class=\"rss-line\" points=\"{}\"><title>RSS</title></polyline>",
        line(|s| s.heap_bytes),
        line(|s| s.rss_bytes)
    );
    close(&mut svg);
    svg.push_str(&legend([("rss", "RSS"), ("heap", "heap")].into_iter()));
    svg
}

fn open(frame: &Frame, index: usize, name: &str) -> String {
    let mut svg = format!(
        "<svg class=\"chart {name}\" data-chart=\"{index}\" data-x0=\"{LEFT}\" data-x1=\"{}\" data-t0=\"{}\" data-t1=\"{}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{name} over time\" xmlns=\"http://www.w3.org/2000/svg\">",
        WIDTH - RIGHT,
        frame.t0,
        frame.t1
    );
    for i in 0..=4 {
        let bytes = frame.max * f64::from(i) / 4.0;
        let y = frame.y(bytes);
        let _ = write!(
            svg,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            escape(&format::bytes(bytes as u64))
        );
    }
    for i in 0..=5 {
        let t = frame.t0 + (frame.t1 - frame.t0) * f64::from(i) / 5.0;
        let x = frame.x(t);
        let _ = write!(
            svg,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{t:.0} s</text>",
            HEIGHT - BOTTOM + 16.0
        );
    }
    let _ = write!(
        svg,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{b}\" y2=\"{b}\"/>",
        WIDTH - RIGHT,
        b = HEIGHT - BOTTOM
    );
    svg
}

/// The window the verdict judged; labelled as the leak window when the
/// heap leaked in it.
fn window(svg: &mut String, frame: &Frame, p: &ProcessOutcome) {
    if p.judged_to_seconds <= p.judged_from_seconds {
        return;
    }
    let leak = p.verdict.leaking;
    let class = if leak { "window leak" } else { "window" };
    let label = if leak { "leak window" } else { "judged window" };
    let x0 = frame.x(p.judged_from_seconds);
    let x1 = frame.x(p.judged_to_seconds);
    let _ = write!(
        svg,
        "<rect class=\"{class}\" x=\"{x0:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{}\"><title>{label}: {:.1}-{:.1} s</title></rect><text class=\"{}\" x=\"{:.1}\" y=\"{}\">{label}</text>",
        (x1 - x0).max(1.0),
        HEIGHT - TOP - BOTTOM,
        p.judged_from_seconds,
        p.judged_to_seconds,
        if leak {
            "window-label leak"
        } else {
            "window-label"
        },
        x0 + 4.0,
        TOP + 12.0
    );
}

fn close(svg: &mut String) {
    let _ = write!(
        svg,
        "<line class=\"cursor\" x1=\"0\" x2=\"0\" y1=\"{TOP}\" y2=\"{}\" visibility=\"hidden\"/></svg>",
        HEIGHT - BOTTOM
    );
}

fn legend<'a>(keys: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let items: String = keys
        .map(|(class, name)| format!("<span><i class=\"key-{class}\"></i>{}</span>", escape(name)))
        .collect();
    format!("<div class=\"legend\">{items}</div>")
}

/// The smallest of 1, 2 or 5 times a power of two's binary unit step at
/// or above `bytes`, so that the axis's four steps are round figures.
fn nice_ceiling(bytes: f64) -> f64 {
    let mut unit = 1.0;
    while unit * 1024.0 <= bytes {
        unit *= 1024.0;
    }
    let steps = [
        1.0, 2.0, 4.0, 8.0, 10.0, 20.0, 40.0, 80.0, 100.0, 200.0, 400.0, 800.0, 1000.0, 1024.0,
    ];
    steps
        .into_iter()
        .map(|s| s * unit)
        .find(|&v| v >= bytes)
        .unwrap_or(bytes)
}
