//! Numbers for humans.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `12.3 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// Bytes with a binary unit picked to keep the number short: `512 B`, `4.0 KiB`, `1.5 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// A compact age: `45s`, `12m03s`, `3h04m`, `2d03h`.
pub fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// RFC 3339 (UTC, seconds) of a Unix time.
pub fn rfc3339(unix_secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_secs)).to_string()
}

/// RFC 3339 (UTC, nanoseconds) of a CLOCK_REALTIME reading in nanoseconds.
pub fn rfc3339_ns(ns: i128) -> String {
    match u64::try_from(ns) {
        Ok(ns) => {
            humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
        }
        Err(_) => format!("{ns} ns"),
    }
}

/// A clock reading in nanoseconds as seconds: `12345.678901234 s`.
pub fn secs_ns(ns: i128) -> String {
    let sign = if ns < 0 { "-" } else { "" };
    let a = ns.unsigned_abs();
    format!("{sign}{}.{:09} s", a / 1_000_000_000, a % 1_000_000_000)
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The command line as one string, quoting arguments that need it.
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(mib(12_897_485), "12.3 MiB");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(4096), "4.0 KiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
        assert_eq!(age(45), "45s");
        assert_eq!(age(723), "12m03s");
        assert_eq!(age(3 * 3600 + 4 * 60 + 5), "3h04m");
        assert_eq!(age(2 * 86_400 + 3 * 3600), "2d03h");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(secs_ns(1_500_000_000), "1.500000000 s");
        assert_eq!(secs_ns(-1), "-0.000000001 s");
        let argv = ["sh", "-c", "echo it's"].map(String::from);
        assert_eq!(shell_words(&argv), r"sh -c 'echo it'\''s'");
    }
}
