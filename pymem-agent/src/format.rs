//! Human formatting, shared by `pymem top` and the site commands: byte
//! sizes in binary units, growth rates, durations, and tracemalloc's sizes.

const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];

/// `512 B`, `1.5 KiB`, `120.3 MiB` (binary units, like RSS in ps/top).
pub fn bytes(n: u64) -> String {
    bytes_f64(n as f64)
}

fn bytes_f64(n: f64) -> String {
    if n < 1024.0 {
        return format!("{n:.0} B");
    }
    let mut value = n / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A growth rate per minute with an explicit sign: `+3.0 MiB/min`.
/// Per minute because leaks are read over minutes, and per-second figures
/// of slow leaks look like noise.
pub fn rate_per_minute(bytes_per_second: f64) -> String {
    let per_minute = bytes_per_second * 60.0;
    if !per_minute.is_finite() || per_minute.abs() < 1.0 {
        return "0 B/min".to_string();
    }
    let sign = if per_minute > 0.0 { '+' } else { '-' };
    format!("{sign}{}/min", bytes_f64(per_minute.abs()))
}

/// `45s`, `3m 05s`, `2h 07m`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// A time to come in its largest whole unit, rounded down (sooner, never
/// later), in at most four characters: `45s`, `42m`, `3h`, `12d`, `2y`
/// (999y at most); `-` for none.
pub fn eta(seconds: Option<f64>) -> String {
    const DAY: u64 = 86400;
    const YEAR: u64 = 365 * DAY;
    let Some(seconds) = seconds.filter(|s| s.is_finite()) else {
        return "-".to_string();
    };
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..DAY => format!("{}h", s / 3600),
        DAY..YEAR => format!("{}d", s / DAY),
        _ => format!("{}y", (s / YEAR).min(999)),
    }
}

/// tracemalloc's `_format_size`: three significant digits below 100 of a
/// unit (`12.5 MiB`), else four or five digits (`9876 KiB`), with an
/// explicit sign for differences. Kept identical so that pymem's diff reads
/// like `Snapshot.compare_to()`.
pub fn tracemalloc_size(size: f64, signed: bool) -> String {
    let mut size = size;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if size.abs() < 100.0 && unit != "B" {
            return if signed {
                format!("{size:+.1} {unit}")
            } else {
                format!("{size:.1} {unit}")
            };
        }
        if size.abs() < 10.0 * 1024.0 || unit == "TiB" {
            return if signed {
                format!("{size:+.0} {unit}")
            } else {
                format!("{size:.0} {unit}")
            };
        }
        size /= 1024.0;
    }
    unreachable!("TiB always returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(120 << 20), "120.0 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn rates_are_signed_per_minute() {
        assert_eq!(rate_per_minute(1024.0 * 1024.0 / 60.0), "+1.0 MiB/min");
        assert_eq!(rate_per_minute(-2048.0 / 60.0), "-2.0 KiB/min");
        assert_eq!(rate_per_minute(0.001), "0 B/min");
        assert_eq!(rate_per_minute(f64::NAN), "0 B/min");
    }

    #[test]
    fn durations_pick_two_units() {
        assert_eq!(duration(45.2), "45s");
        assert_eq!(duration(185.0), "3m 05s");
        assert_eq!(duration(7620.0), "2h 07m");
    }

    #[test]
    fn etas_keep_their_largest_unit_rounded_down() {
        assert_eq!(eta(None), "-");
        assert_eq!(eta(Some(f64::NAN)), "-");
        assert_eq!(eta(Some(f64::INFINITY)), "-");
        assert_eq!(eta(Some(0.0)), "0s");
        assert_eq!(eta(Some(-3.0)), "0s");
        assert_eq!(eta(Some(59.9)), "59s");
        assert_eq!(eta(Some(2520.0)), "42m");
        assert_eq!(eta(Some(3599.0)), "59m");
        assert_eq!(eta(Some(3.0 * 3600.0 + 1800.0)), "3h");
        assert_eq!(eta(Some(12.0 * 86400.0)), "12d");
        assert_eq!(eta(Some(364.9 * 86400.0)), "364d");
        assert_eq!(eta(Some(800.0 * 86400.0)), "2y");
        assert_eq!(eta(Some(1e15)), "999y");
    }

    #[test]
    fn sizes_format_like_tracemalloc() {
        // Values checked against CPython's tracemalloc._format_size.
        assert_eq!(tracemalloc_size(0.0, false), "0 B");
        assert_eq!(tracemalloc_size(0.0, true), "+0 B");
        assert_eq!(tracemalloc_size(10239.0, false), "10239 B");
        assert_eq!(tracemalloc_size(10240.0, false), "10.0 KiB");
        assert_eq!(tracemalloc_size(-2_500_000.0, true), "-2441 KiB");
        assert_eq!(tracemalloc_size(15_000_000.0, true), "+14.3 MiB");
    }
}
