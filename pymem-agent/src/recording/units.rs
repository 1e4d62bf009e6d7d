//! Human units on the command line: sizes (`500MiB`, `1.5GB`, `4096`),
//! rates (`2MiB/min`, `100KiB/s`) and shares of a run (`25%` or `10s`).
use std::time::Duration;

/// Bytes of `text`: a number with an optional unit, binary (`KiB`, `MiB`,
/// `GiB`, `TiB`) or decimal (`kB`, `MB`, `GB`, `TB`), `B` or none for bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 500MiB, 2GB, 4096)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
                "{other:?} is not a size unit (B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)"
            ));
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Bytes per second of `text`: a size per `s`, `min` or `h` (`2MiB/min`).
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let (size, per) = text
        .rsplit_once('/')
        .ok_or_else(|| format!("{text:?} is not a rate (e.g. 2MiB/min, 100KiB/s)"))?;
    let seconds = match per.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        other => return Err(format!("{other:?} is not a time unit (s, min, h)")),
    };
    Ok(parse_size(size)? as f64 / seconds)
}

/// The warm-up of a run: a share of the whole run or a fixed time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Warmup {
    Share(f64),
    Fixed(Duration),
}

impl Warmup {
    /// Seconds of warm-up in a run of `run_seconds`.
    pub fn seconds(&self, run_seconds: f64) -> f64 {
        match *self {
            Self::Share(share) => run_seconds * share,
            Self::Fixed(duration) => duration.as_secs_f64().min(run_seconds),
        }
    }
}

impl std::fmt::Display for Warmup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Share(share) => write!(f, "{}%", share * 100.0),
            Self::Fixed(duration) => write!(f, "{}", humantime::format_duration(*duration)),
        }
    }
}

/// `25%` (of the run) or a duration (`10s`, `1m`).
pub fn parse_warmup(text: &str) -> Result<Warmup, String> {
    if let Some(percent) = text.trim().strip_suffix('%') {
        let share: f64 = percent
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not a percentage"))?;
        if !(0.0..100.0).contains(&share) {
            return Err(format!(
                "{text:?}: the warm-up must be under 100% of the run"
            ));
        }
        return Ok(Warmup::Share(share / 100.0));
    }
    humantime::parse_duration(text.trim())
        .map(Warmup::Fixed)
        .map_err(|e| format!("{text:?} is neither a share (25%) nor a duration (10s): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_binary_and_decimal_units() {
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("1e400").is_err());
    }

    #[test]
    fn rates_per_second_minute_and_hour() {
        assert_eq!(parse_rate("2MiB/min"), Ok(2.0 * 1024.0 * 1024.0 / 60.0));
        assert_eq!(parse_rate("100KiB/s"), Ok(102_400.0));
        assert_eq!(parse_rate("36MB/h"), Ok(10_000.0));
        assert!(parse_rate("2MiB").is_err());
        assert!(parse_rate("2MiB/fortnight").is_err());
    }

    #[test]
    fn warmups_as_shares_or_durations() {
        assert_eq!(parse_warmup("25%"), Ok(Warmup::Share(0.25)));
        assert_eq!(
            parse_warmup("10s"),
            Ok(Warmup::Fixed(Duration::from_secs(10)))
        );
        assert!(parse_warmup("100%").is_err());
        assert!(parse_warmup("soon").is_err());
        assert_eq!(Warmup::Share(0.25).seconds(40.0), 10.0);
        assert_eq!(Warmup::Fixed(Duration::from_secs(60)).seconds(40.0), 40.0);
    }
}
