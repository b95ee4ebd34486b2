//! The timestamp of a log line, as tracing-subscriber's `SystemTime` timer writes it (RFC 3339, UTC,
//! microseconds: `2026-12-03T17:41:39.575118Z`), with the part to the second formatted once a second
//! per thread: formatting the whole date per line cost about 2,000 instructions of a request's
//! ~108k (callgrind, BENCHMARKS.md "Instructions per request").

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// Give it to `fmt().with_timer(..)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timestamp;

impl FormatTime for Timestamp {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write_now(w)
    }
}

/// Writes the time now.
pub fn write_now(w: &mut impl fmt::Write) -> fmt::Result {
    // A clock set before 1970 shows the epoch.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    write_at(w, now.as_secs(), now.subsec_micros())
}

/// Writes the time `secs` seconds and `micros` microseconds after the epoch.
fn write_at(w: &mut impl fmt::Write, secs: u64, micros: u32) -> fmt::Result {
    thread_local!(static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) });
    SECOND.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            text.clear();
            write_second(text, secs)?;
        }
        w.write_str(text)?;
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(micros);
        w.write_char('.')?;
        for _ in digits.len()..6 {
            w.write_char('0')?;
        }
        w.write_str(digits)?;
        w.write_char('Z')
    })
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` after the epoch.
fn write_second(out: &mut String, secs: u64) -> fmt::Result {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    write!(out, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

/// Year, month and day of `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`, proleptic
/// Gregorian; days after the epoch only, so every quantity stays unsigned).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // day of the 400-year era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the year from March 1st, [0, 365]
    let mp = (5 * doy + 2) / 153; // month from March, [0, 11]
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, micros: u32) -> String {
        let mut s = String::new();
        write_at(&mut s, secs, micros).expect("writes");
        s
    }

    #[test]
    fn dates_across_leap_days_centuries_and_the_last_four_digit_year() {
        // Expected values from Python's datetime.
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(951_868_799, 999_999), "2000-02-29T23:59:59.999999Z");
        assert_eq!(at(1_796_313_699, 575_118), "2026-12-03T16:01:39.575118Z");
        assert_eq!(at(4_102_444_800, 120), "2100-01-01T00:00:00.000120Z");
        assert_eq!(at(253_402_300_799, 1), "9999-12-31T23:59:59.000001Z");
        // The same second again (from the cache), then the next.
        assert_eq!(at(1_796_313_699, 1), "2026-12-03T16:01:39.000001Z");
        assert_eq!(at(1_796_313_700, 0), "2026-12-03T16:01:40.000000Z");
    }

    #[test]
    fn writes_what_the_tracing_timer_writes_to_the_second() {
        use tracing_subscriber::fmt::time::SystemTime as Tracing;
        // Retried when the two readings fall in different seconds.
        for _ in 0..10 {
            let (mut ours, mut theirs) = (String::new(), String::new());
            Timestamp.format_time(&mut Writer::new(&mut ours)).expect("ours");
            Tracing.format_time(&mut Writer::new(&mut theirs)).expect("theirs");
            assert_eq!((ours.len(), ours.as_bytes()[19], ours.ends_with('Z')), (27, b'.', true), "{ours}");
            if ours[..19] == theirs[..19] {
                assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
                return;
            }
        }
        panic!("never in the same second");
    }
}
