//! Window arithmetic: which window a moment falls in, when it ends, and a
//! stable id for counter keys. Pure functions of the time passed in.
//! Plain calendar windows are in UTC; a `Window::Local` one is reckoned in
//! its time zone with jiff's bundled tz database, so a day there lasts 23,
//! 24 or 25 hours as its clocks do.

use crate::policy::{CalendarPeriod, LocalCalendar, Window, Zone};

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
            // Every counter of every decision has one of these ids, so it
            // is written digit by digit rather than through `format!`:
            // `y:04-m:02-d:02`, with `w` before a week's, `Thh` after an
            // hour's and `Thh:mm` after a minute's.
            let mut id = String::with_capacity(17);
            if period == CalendarPeriod::Week {
                id.push('w');
            }
            push_padded(&mut id, y, 4);
            id.push('-');
            push_padded(&mut id, i64::from(m), 2);
            if period != CalendarPeriod::Month {
                id.push('-');
                push_padded(&mut id, i64::from(d), 2);
            }
            if matches!(period, CalendarPeriod::Minute | CalendarPeriod::Hour) {
                id.push('T');
                push_padded(&mut id, hh, 2);
            }
            if period == CalendarPeriod::Minute {
                id.push(':');
                push_padded(&mut id, mm, 2);
            }
            WindowSpan {
                id,
                end: Some(end),
                start: Some(start),
            }
        }
        Window::Local(cal) => {
            let (start, end, (y, m, d)) = local_bounds(cal, now);
            let zone = cal.zone.name();
            // The window's kind, anchor and zone are all in the id, so a
            // rule moved to another zone or billing day never reads the
            // counters of the old one.
            let id = match cal.period {
                CalendarPeriod::Week => format!("w{y:04}-{m:02}-{d:02}@{zone}"),
                CalendarPeriod::Month => format!("m{}:{y:04}-{m:02}-{d:02}@{zone}", cal.anchor),
                _ => format!("d{y:04}-{m:02}-{d:02}@{zone}"),
            };
            WindowSpan {
                id,
                end: Some(end),
                start: Some(start),
            }
        }
    }
}

/// Appends `n` as `format!("{n:0width$}")` writes it.
fn push_padded(out: &mut String, n: i64, width: usize) {
    if n < 0 {
        use std::fmt::Write;
        let _ = write!(out, "{n:0width$}");
        return;
    }
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = n as u64;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for _ in digits.len() - start..width {
        out.push('0');
    }
    for &b in &digits[start..] {
        out.push(char::from(b));
    }
}

/// Start (inclusive) and end (exclusive) of the local window holding
/// `now`, with the local date it starts on. A monthly anchor past the end
/// of a shorter month falls on that month's last day.
pub fn local_bounds(cal: LocalCalendar, now: Millis) -> (Millis, Millis, (i64, u32, u32)) {
    let today = local_day(cal.zone, now);
    let (first, next) = match cal.period {
        CalendarPeriod::Week => {
            // Day 0 was a Thursday: (days + 3) mod 7 is 0 on Mondays.
            let weekday = (today + 3).rem_euclid(7);
            let back = (weekday - i64::from(cal.anchor.clamp(1, 7)) + 1).rem_euclid(7);
            (today - back, today - back + 7)
        }
        CalendarPeriod::Month => {
            let (y, m, _) = civil_from_days(today);
            let this = billing_day(y, m, cal.anchor);
            let (py, pm) = if m == 1 { (y - 1, 12) } else { (y, m - 1) };
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            if today >= this {
                (this, billing_day(ny, nm, cal.anchor))
            } else {
                (billing_day(py, pm, cal.anchor), this)
            }
        }
        _ => (today, today + 1),
    };
    (
        local_midnight(cal.zone, first),
        local_midnight(cal.zone, next),
        civil_from_days(first),
    )
}

/// The billing day of a month: the anchor, or the month's last day when
/// the month is shorter.
fn billing_day(y: i64, m: u32, anchor: u8) -> i64 {
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let length = days_from_civil(ny, nm, 1) - days_from_civil(y, m, 1);
    days_from_civil(y, m, 1) + (i64::from(anchor.max(1)) - 1).min(length - 1)
}

/// The local date of `at` in `zone`, as days since 1970-01-01. Outside
/// what the zone library can represent, the UTC date.
pub fn local_day(zone: Zone, at: Millis) -> i64 {
    jiff::Timestamp::from_millisecond(at)
        .map(|ts| {
            let date = ts.to_zoned(zone.tz().clone()).date();
            days_from_civil(
                i64::from(date.year()),
                date.month() as u32,
                date.day() as u32,
            )
        })
        .unwrap_or_else(|_| at.div_euclid(DAY))
}

/// The first instant of a local date in `zone`: its midnight, or, where
/// the clocks skip midnight, the first moment after the gap.
pub fn local_midnight(zone: Zone, day: i64) -> Millis {
    let (y, m, d) = civil_from_days(day);
    i16::try_from(y)
        .ok()
        .and_then(|y| jiff::civil::Date::new(y, m as i8, d as i8).ok())
        .and_then(|date| date.to_zoned(zone.tz().clone()).ok())
        .map(|z| z.timestamp().as_millisecond())
        .unwrap_or(day * DAY)
}

/// RFC 3339 in a window's zone, to the second, with its offset
/// (`2026-12-15T00:00:00+01:00`); UTC windows give `Z` as [`format_utc`].
pub fn format_in(window: Window, t: Millis) -> String {
    let Window::Local(cal) = window else {
        return format_utc(t);
    };
    match jiff::Timestamp::from_millisecond(t) {
        Ok(ts) if cal.zone.name() != "UTC" => {
            let z = ts.to_zoned(cal.zone.tz().clone());
            let secs = z.offset().seconds();
            let sign = if secs < 0 { '-' } else { '+' };
            let secs = secs.unsigned_abs();
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
                z.year(),
                z.month(),
                z.day(),
                z.hour(),
                z.minute(),
                z.second(),
                secs / 3600,
                secs % 3600 / 60
            )
        }
        _ => format_utc(t),
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
    fn calendar_ids_are_written_as_format_writes_them() {
        let periods = [
            CalendarPeriod::Minute,
            CalendarPeriod::Hour,
            CalendarPeriod::Day,
            CalendarPeriod::Week,
            CalendarPeriod::Month,
        ];
        // From before 1970 to past 9999, a few days and minutes apart.
        let mut t: Millis = -90 * 365 * DAY;
        while t < 8100 * 365 * DAY {
            for period in periods {
                let (start, _) = calendar_bounds(period, t);
                let (y, m, d) = civil_from_days(start.div_euclid(DAY));
                let hh = start.rem_euclid(DAY) / HOUR;
                let mm = start.rem_euclid(HOUR) / MINUTE;
                let want = match period {
                    CalendarPeriod::Minute => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}"),
                    CalendarPeriod::Hour => format!("{y:04}-{m:02}-{d:02}T{hh:02}"),
                    CalendarPeriod::Day => format!("{y:04}-{m:02}-{d:02}"),
                    CalendarPeriod::Week => format!("w{y:04}-{m:02}-{d:02}"),
                    CalendarPeriod::Month => format!("{y:04}-{m:02}"),
                };
                assert_eq!(span(Window::Calendar(period), t).id, want, "at {t}");
            }
            t += 3 * DAY + 7 * HOUR + 13 * MINUTE;
        }
        let mut out = String::new();
        push_padded(&mut out, -7, 4);
        assert_eq!(out, format!("{:04}", -7));
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

    fn local(period: CalendarPeriod, zone: &str, anchor: u8) -> Window {
        Window::Local(LocalCalendar {
            period,
            zone: Zone::get(zone).unwrap(),
            anchor,
        })
    }

    const HOURS: i64 = HOUR;

    #[test]
    fn berlin_days_last_23_and_25_hours_at_the_dst_changes() {
        let daily = local(CalendarPeriod::Day, "Europe/Berlin", 0);
        // Spring forward: 2026-03-29 runs from 00:00 CET to 00:00 CEST.
        let spring = span(daily, at(2026, 3, 29, 12, 0, 0));
        assert_eq!(spring.id, "d2026-03-29@Europe/Berlin");
        assert_eq!(spring.start, Some(at(2026, 3, 28, 23, 0, 0)));
        assert_eq!(spring.end, Some(at(2026, 3, 29, 22, 0, 0)));
        assert_eq!(spring.end.unwrap() - spring.start.unwrap(), 23 * HOURS);
        // Fall back: 2026-10-25 has 25 hours.
        let fall = span(daily, at(2026, 10, 25, 1, 30, 0));
        assert_eq!(fall.id, "d2026-10-25@Europe/Berlin");
        assert_eq!(fall.start, Some(at(2026, 10, 24, 22, 0, 0)));
        assert_eq!(fall.end, Some(at(2026, 10, 25, 23, 0, 0)));
        assert_eq!(fall.end.unwrap() - fall.start.unwrap(), 25 * HOURS);
        // The last millisecond of a local day is still in it.
        let last = span(daily, at(2026, 10, 25, 23, 0, 0) - 1);
        assert_eq!(last.id, "d2026-10-25@Europe/Berlin");
        assert_eq!(
            span(daily, at(2026, 10, 25, 23, 0, 0)).id,
            "d2026-10-26@Europe/Berlin"
        );
    }

    #[test]
    fn new_york_days_and_weeks_follow_its_dst_changes() {
        let daily = local(CalendarPeriod::Day, "America/New_York", 0);
        let spring = span(daily, at(2026, 3, 8, 12, 0, 0));
        assert_eq!(spring.start, Some(at(2026, 3, 8, 5, 0, 0)));
        assert_eq!(spring.end, Some(at(2026, 3, 9, 4, 0, 0)));
        let fall = span(daily, at(2026, 11, 1, 12, 0, 0));
        assert_eq!(fall.start, Some(at(2026, 11, 1, 4, 0, 0)));
        assert_eq!(fall.end, Some(at(2026, 11, 2, 5, 0, 0)));
        assert_eq!(fall.end.unwrap() - fall.start.unwrap(), 25 * HOURS);
        // 03:30 UTC on 2026-11-01 is still Saturday evening in New York.
        assert_eq!(
            span(daily, at(2026, 11, 1, 3, 30, 0)).id,
            "d2026-10-31@America/New_York"
        );
        // A week from Sunday that holds the fall-back: 7 days and 1 hour.
        let weekly = local(CalendarPeriod::Week, "America/New_York", 7);
        let week = span(weekly, at(2026, 11, 4, 12, 0, 0));
        assert_eq!(week.id, "w2026-11-01@America/New_York");
        assert_eq!(week.start, Some(at(2026, 11, 1, 4, 0, 0)));
        assert_eq!(week.end, Some(at(2026, 11, 8, 5, 0, 0)));
        // Saturday night local is the same week; Sunday starts the next.
        assert_eq!(
            span(weekly, at(2026, 11, 8, 4, 59, 59)).id,
            "w2026-11-01@America/New_York"
        );
        assert_eq!(
            span(weekly, at(2026, 11, 8, 5, 0, 0)).id,
            "w2026-11-08@America/New_York"
        );
    }

    #[test]
    fn a_billing_month_across_a_dst_change() {
        let monthly = local(CalendarPeriod::Month, "Europe/Berlin", 15);
        let s = span(monthly, at(2026, 4, 1, 0, 0, 0));
        assert_eq!(s.id, "m15:2026-03-15@Europe/Berlin");
        assert_eq!(s.start, Some(at(2026, 3, 14, 23, 0, 0)));
        assert_eq!(s.end, Some(at(2026, 4, 14, 22, 0, 0)));
        // Before the 15th is the period that began on the previous 15th.
        let early = span(monthly, at(2026, 12, 14, 22, 59, 59));
        assert_eq!(early.id, "m15:2026-11-15@Europe/Berlin");
        assert_eq!(early.end, Some(at(2026, 12, 14, 23, 0, 0)));
        assert_eq!(
            span(monthly, at(2026, 12, 14, 23, 0, 0)).id,
            "m15:2026-12-15@Europe/Berlin"
        );
    }

    /// (anchor, an instant, expected start date, expected end date), UTC.
    fn anchored(anchor: u8, now: Millis) -> (Millis, Millis) {
        let s = span(local(CalendarPeriod::Month, "UTC", anchor), now);
        (s.start.unwrap(), s.end.unwrap())
    }

    #[test]
    fn anchors_29_30_31_fall_on_the_last_day_of_shorter_months() {
        let cases = [
            // 2026: February has 28 days.
            (
                29,
                at(2026, 2, 10, 0, 0, 0),
                at(2026, 1, 29, 0, 0, 0),
                at(2026, 2, 28, 0, 0, 0),
            ),
            (
                29,
                at(2026, 3, 1, 0, 0, 0),
                at(2026, 2, 28, 0, 0, 0),
                at(2026, 3, 29, 0, 0, 0),
            ),
            (
                30,
                at(2026, 2, 28, 0, 0, 0),
                at(2026, 2, 28, 0, 0, 0),
                at(2026, 3, 30, 0, 0, 0),
            ),
            (
                30,
                at(2026, 4, 30, 0, 0, 0),
                at(2026, 4, 30, 0, 0, 0),
                at(2026, 5, 30, 0, 0, 0),
            ),
            (
                31,
                at(2026, 4, 29, 0, 0, 0),
                at(2026, 3, 31, 0, 0, 0),
                at(2026, 4, 30, 0, 0, 0),
            ),
            (
                31,
                at(2026, 4, 30, 0, 0, 0),
                at(2026, 4, 30, 0, 0, 0),
                at(2026, 5, 31, 0, 0, 0),
            ),
            (
                31,
                at(2026, 6, 15, 0, 0, 0),
                at(2026, 5, 31, 0, 0, 0),
                at(2026, 6, 30, 0, 0, 0),
            ),
            (
                31,
                at(2026, 12, 31, 0, 0, 0),
                at(2026, 12, 31, 0, 0, 0),
                at(2027, 1, 31, 0, 0, 0),
            ),
            // 2028 is a leap year: February has a 29th, and anchors 29, 30
            // and 31 all fall on it.
            (
                29,
                at(2028, 2, 29, 0, 0, 0),
                at(2028, 2, 29, 0, 0, 0),
                at(2028, 3, 29, 0, 0, 0),
            ),
            (
                30,
                at(2028, 2, 29, 0, 0, 0),
                at(2028, 2, 29, 0, 0, 0),
                at(2028, 3, 30, 0, 0, 0),
            ),
            (
                31,
                at(2028, 2, 28, 0, 0, 0),
                at(2028, 1, 31, 0, 0, 0),
                at(2028, 2, 29, 0, 0, 0),
            ),
            (
                31,
                at(2028, 3, 1, 0, 0, 0),
                at(2028, 2, 29, 0, 0, 0),
                at(2028, 3, 31, 0, 0, 0),
            ),
            // 2100 is not.
            (
                29,
                at(2100, 3, 1, 0, 0, 0),
                at(2100, 2, 28, 0, 0, 0),
                at(2100, 3, 29, 0, 0, 0),
            ),
        ];
        for (anchor, now, start, end) in cases {
            assert_eq!(
                anchored(anchor, now),
                (start, end),
                "anchor {anchor} at {}",
                format_utc(now)
            );
        }
    }

    #[test]
    fn windows_differ_in_id_by_zone_and_anchor() {
        let now = at(2026, 12, 20, 12, 0, 0);
        let ids: Vec<String> = [
            Window::Calendar(CalendarPeriod::Month),
            local(CalendarPeriod::Month, "Europe/Berlin", 1),
            local(CalendarPeriod::Month, "Europe/Berlin", 15),
            local(CalendarPeriod::Month, "America/New_York", 15),
            local(CalendarPeriod::Month, "UTC", 15),
            Window::Calendar(CalendarPeriod::Day),
            local(CalendarPeriod::Day, "Europe/Berlin", 0),
            Window::Calendar(CalendarPeriod::Week),
            local(CalendarPeriod::Week, "Europe/Berlin", 1),
        ]
        .into_iter()
        .map(|w| span(w, now).id)
        .collect();
        let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
        // Anchors 30 and 31 start on the same day in November but are
        // different windows.
        let nov = at(2026, 11, 30, 12, 0, 0);
        assert_ne!(
            span(local(CalendarPeriod::Month, "UTC", 30), nov).id,
            span(local(CalendarPeriod::Month, "UTC", 31), nov).id
        );
        // UTC windows keep the names they always had.
        assert_eq!(
            span(Window::Calendar(CalendarPeriod::Month), now).id,
            "2026-12"
        );
    }

    #[test]
    fn reset_instants_are_shown_in_the_windows_zone() {
        let berlin = local(CalendarPeriod::Month, "Europe/Berlin", 15);
        let end = span(berlin, at(2026, 12, 20, 0, 0, 0)).end.unwrap();
        assert_eq!(format_in(berlin, end), "2027-01-15T00:00:00+01:00");
        let ny = local(CalendarPeriod::Day, "America/New_York", 0);
        let end = span(ny, at(2026, 7, 1, 12, 0, 0)).end.unwrap();
        assert_eq!(format_in(ny, end), "2026-07-02T00:00:00-04:00");
        assert_eq!(
            format_in(Window::Calendar(CalendarPeriod::Day), end),
            "2026-07-02T04:00:00Z"
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
