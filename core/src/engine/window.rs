//! Window arithmetic in UTC: which window a moment falls in, when it ends,
//! and a stable id for counter keys. Pure functions of the time passed in.

use crate::policy::{CalendarPeriod, Window};

pub use crate::clock::Millis;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// The window a counter belongs to at a given moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpan {
    /// Part of the counter key; changes exactly when the window resets.
    pub id: String,
    /// When the window resets, when that is known in advance. Rolling
    /// windows reset a fixed time after first use, which only the store
    /// knows; lifetime windows never reset.
    pub end: Option<Millis>,
    /// When the window began, when that is known without the store.
    pub start: Option<Millis>,
}

pub fn span(window: Window, now: Millis) -> WindowSpan {
    match window {
        Window::Lifetime => WindowSpan {
            id: "all".to_string(),
            end: None,
            start: None,
        },
        Window::Rolling(secs) => WindowSpan {
            id: format!("r{secs}"),
            end: None,
            start: None,
        },
        Window::Calendar(period) => {
            let (start, end) = calendar_bounds(period, now);
            let (y, m, d) = civil_from_days(start.div_euclid(DAY));
            let hh = start.rem_euclid(DAY) / HOUR;
            let mm = start.rem_euclid(HOUR) / MINUTE;
            let id = match period {
                CalendarPeriod::Minute => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}"),
                CalendarPeriod::Hour => format!("{y:04}-{m:02}-{d:02}T{hh:02}"),
                CalendarPeriod::Day => format!("{y:04}-{m:02}-{d:02}"),
                CalendarPeriod::Week => format!("w{y:04}-{m:02}-{d:02}"),
                CalendarPeriod::Month => format!("{y:04}-{m:02}"),
            };
            WindowSpan {
                id,
                end: Some(end),
                start: Some(start),
            }
        }
    }
}

/// Start (inclusive) and end (exclusive) of the calendar window holding `now`.
pub fn calendar_bounds(period: CalendarPeriod, now: Millis) -> (Millis, Millis) {
    let fixed = |len: i64| {
        let start = now.div_euclid(len) * len;
        (start, start + len)
    };
    match period {
        CalendarPeriod::Minute => fixed(MINUTE),
        CalendarPeriod::Hour => fixed(HOUR),
        CalendarPeriod::Day => fixed(DAY),
        CalendarPeriod::Week => {
            let days = now.div_euclid(DAY);
            // 1970-01-01 was a Thursday: three days after a Monday.
            let monday = days - (days + 3).rem_euclid(7);
            (monday * DAY, (monday + 7) * DAY)
        }
        CalendarPeriod::Month => {
            let (y, m, _) = civil_from_days(now.div_euclid(DAY));
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (
                days_from_civil(y, m, 1) * DAY,
                days_from_civil(ny, nm, 1) * DAY,
            )
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// RFC 3339 in UTC, to the second.
pub fn format_utc(t: Millis) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(DAY));
    let in_day = t.rem_euclid(DAY) / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

/// Whole seconds from `now` until `t`, rounded up, at least 1.
pub fn seconds_until(now: Millis, t: Millis) -> u64 {
    let ms = (t - now).max(1);
    ((ms + 999) / 1000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, m: u32, d: u32, hh: i64, mm: i64, ss: i64) -> Millis {
        days_from_civil(y, m, d) * DAY + hh * HOUR + mm * MINUTE + ss * 1000
    }

    #[test]
    fn civil_round_trip_over_four_centuries() {
        for days in (-200_000..200_000).step_by(37) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28),
            2
        );
    }

    #[test]
    fn day_boundary_is_utc_midnight() {
        let before = span(
            Window::Calendar(CalendarPeriod::Day),
            at(2026, 11, 21, 23, 59, 59) + 999,
        );
        let after = span(
            Window::Calendar(CalendarPeriod::Day),
            at(2026, 11, 22, 0, 0, 0),
        );
        assert_eq!(before.id, "2026-11-21");
        assert_eq!(after.id, "2026-11-22");
        assert_eq!(before.end, Some(at(2026, 11, 22, 0, 0, 0)));
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2026-11-16 is a Monday; 2026-11-22 a Sunday.
        let sunday = span(
            Window::Calendar(CalendarPeriod::Week),
            at(2026, 11, 22, 23, 0, 0),
        );
        let monday = span(
            Window::Calendar(CalendarPeriod::Week),
            at(2026, 11, 23, 0, 0, 0),
        );
        assert_eq!(sunday.id, "w2026-11-16");
        assert_eq!(monday.id, "w2026-11-23");
        assert_eq!(sunday.end, Some(at(2026, 11, 23, 0, 0, 0)));
        // A week that spans a year end.
        let newyear = span(
            Window::Calendar(CalendarPeriod::Week),
            at(2027, 1, 1, 12, 0, 0),
        );
        assert_eq!(newyear.id, "w2026-12-28");
    }

    #[test]
    fn month_ends_and_leap_years() {
        let cases = [
            (
                at(2024, 2, 29, 23, 59, 59),
                "2024-02",
                at(2024, 3, 1, 0, 0, 0),
            ),
            (
                at(2023, 2, 28, 12, 0, 0),
                "2023-02",
                at(2023, 3, 1, 0, 0, 0),
            ),
            (
                at(2100, 2, 28, 12, 0, 0),
                "2100-02",
                at(2100, 3, 1, 0, 0, 0),
            ),
            (at(2000, 2, 29, 0, 0, 0), "2000-02", at(2000, 3, 1, 0, 0, 0)),
            (
                at(2026, 12, 31, 23, 59, 59),
                "2026-12",
                at(2027, 1, 1, 0, 0, 0),
            ),
            (
                at(2026, 4, 30, 10, 0, 0),
                "2026-04",
                at(2026, 5, 1, 0, 0, 0),
            ),
        ];
        for (now, id, end) in cases {
            let s = span(Window::Calendar(CalendarPeriod::Month), now);
            assert_eq!(s.id, id);
            assert_eq!(s.end, Some(end), "{id}");
        }
    }

    #[test]
    fn minute_and_hour_windows() {
        let t = at(2026, 11, 21, 13, 5, 42);
        assert_eq!(
            span(Window::Calendar(CalendarPeriod::Minute), t).id,
            "2026-11-21T13:05"
        );
        assert_eq!(
            span(Window::Calendar(CalendarPeriod::Hour), t).id,
            "2026-11-21T13"
        );
        assert_eq!(
            span(Window::Calendar(CalendarPeriod::Hour), t).end,
            Some(at(2026, 11, 21, 14, 0, 0))
        );
    }

    #[test]
    fn formatting_and_rounding() {
        assert_eq!(format_utc(at(2024, 2, 29, 7, 8, 9)), "2024-02-29T07:08:09Z");
        assert_eq!(seconds_until(0, 1), 1);
        assert_eq!(seconds_until(0, 1000), 1);
        assert_eq!(seconds_until(0, 1001), 2);
        assert_eq!(seconds_until(5000, 0), 1);
    }
}
