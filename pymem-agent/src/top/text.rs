//! Text for the terminal: sparklines, shortened commands and cut-off cells.

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The values as a `width`-cell sparkline, newest at the right edge.
/// Scaled between their own minimum and maximum: a heap of hundreds of MiB
/// that grows by one still shows its slope.
pub fn sparkline(values: &[u64], width: usize) -> String {
    let buckets = resample(values, width);
    let (Some(&min), Some(&max)) = (buckets.iter().min(), buckets.iter().max()) else {
        return " ".repeat(width);
    };
    let range = (max - min) as f64;
    let bars: String = buckets
        .iter()
        .map(|&v| {
            if range == 0.0 {
                BARS[0]
            } else {
                let level = ((v - min) as f64 / range * (BARS.len() - 1) as f64).round();
                BARS[level as usize]
            }
        })
        .collect();
    format!("{}{bars}", " ".repeat(width - buckets.len()))
}

/// At most `width` values: the maximum of each of `width` equal runs, so a
/// peak is never averaged away.
fn resample(values: &[u64], width: usize) -> Vec<u64> {
    if values.len() <= width {
        return values.to_vec();
    }
    (0..width)
        .map(|i| {
            let start = i * values.len() / width;
            let end = (i + 1) * values.len() / width;
            values[start..end].iter().copied().max().unwrap_or(0)
        })
        .collect()
}

/// A command line with its program shortened to the file name:
/// `python3.11 -u app.py` instead of `/opt/…/bin/python3.11 -u app.py`.
pub fn short_command(cmdline: &str) -> String {
    let (program, rest) = cmdline.split_once(' ').unwrap_or((cmdline, ""));
    let name = program.rsplit('/').next().unwrap_or(program);
    if rest.is_empty() {
        name.to_string()
    } else {
        format!("{name} {rest}")
    }
}

/// Shortens `text` to `width` characters, marking the cut with `…`.
pub fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let kept: String = text.chars().take(width.saturating_sub(1)).collect();
    format!("{kept}…")
}

/// Shortens `text` to `width` characters from the start, marking the cut
/// with `…`: `…/site-packages/pkg/mod.py:12`.
pub fn truncate_start(text: &str, width: usize) -> String {
    let length = text.chars().count();
    if length <= width {
        return text.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let kept: String = text.chars().skip(length - (width - 1)).collect();
    format!("…{kept}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_scales_between_min_and_max_and_right_aligns() {
        assert_eq!(sparkline(&[10, 20, 30], 5), "  ▁▅█");
        assert_eq!(sparkline(&[7, 7], 3), " ▁▁");
        assert_eq!(sparkline(&[], 3), "   ");
    }

    #[test]
    fn sparkline_keeps_peaks_when_resampling() {
        let values: Vec<u64> = (0..100).map(|i| if i == 51 { 1000 } else { 0 }).collect();
        let line = sparkline(&values, 10);
        assert_eq!(line.chars().count(), 10);
        assert_eq!(line.chars().filter(|&c| c == '█').count(), 1, "{line}");
    }

    #[test]
    fn short_command_drops_the_program_directory() {
        assert_eq!(
            short_command("/usr/bin/python3.11 -u /srv/app.py"),
            "python3.11 -u /srv/app.py"
        );
        assert_eq!(short_command("python3"), "python3");
        assert_eq!(short_command(""), "");
    }

    #[test]
    fn truncate_marks_the_cut() {
        assert_eq!(truncate("python3 -u x.py", 9), "python3 …");
        assert_eq!(truncate("short", 9), "short");
    }

    #[test]
    fn truncate_start_keeps_the_end() {
        assert_eq!(truncate_start("/srv/app/jobs.py:42", 12), "…/jobs.py:42");
        assert_eq!(truncate_start("jobs.py:42", 12), "jobs.py:42");
        assert_eq!(truncate_start("jobs.py:42", 0), "");
    }
}
