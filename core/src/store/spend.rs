//! The spend account: what was used and spent, per day and per owner, as
//! every store keeps it. A row is one combination of the owner dimensions
//! on one day; its entry is the sum of the calls that had them. Settled
//! usage and estimates that were never settled are kept apart.
//!
//! Amounts are integers, so that every store adds them exactly: spend in
//! picodollars (10⁻¹² USD, exact for any price written with up to six
//! decimals per million tokens), video and audio in microseconds.

use std::fmt::Write;

use rust_decimal::Decimal;

use crate::clock::Millis;

/// The dimensions an account row is kept by, in this order everywhere
/// (the CLI's `--by`, the JSON's field names, the row's text form).
pub const DIMENSIONS: [&str; 8] = [
    "model",
    "model_family",
    "team",
    "key",
    "workflow",
    "environment",
    "customer",
    "modality",
];

/// A day, as days since 1970-01-01 in the reporting timezone.
pub type Day = i64;

/// The UTC day of a moment.
pub fn utc_day(at: Millis) -> Day {
    at.div_euclid(86_400_000)
}

/// Where the account's days are cut: at midnight UTC, or at midnight in
/// one IANA time zone (its own bundled copy of the database, so a day's
/// edges never depend on the host), DST included: such a day can last 23
/// or 25 hours.
#[derive(Debug, Clone, Default)]
pub struct DayCalendar {
    zone: Option<(String, jiff::tz::TimeZone)>,
}

impl DayCalendar {
    pub fn utc() -> DayCalendar {
        DayCalendar::default()
    }

    /// `UTC` or an IANA name such as `Europe/Berlin`.
    pub fn named(name: &str) -> Result<DayCalendar, String> {
        if name.eq_ignore_ascii_case("utc") {
            return Ok(DayCalendar::utc());
        }
        jiff::tz::TimeZone::get(name)
            .map(|tz| DayCalendar {
                zone: Some((name.to_string(), tz)),
            })
            .map_err(|e| format!("{name:?} is not an IANA time zone such as Europe/Berlin: {e}"))
    }

    pub fn name(&self) -> &str {
        self.zone.as_ref().map_or("UTC", |(n, _)| n)
    }

    /// The day `at` falls on, as days since 1970-01-01 of its local date.
    pub fn day(&self, at: Millis) -> Day {
        let Some((_, tz)) = &self.zone else {
            return utc_day(at);
        };
        let Ok(ts) = jiff::Timestamp::from_millisecond(at) else {
            return utc_day(at);
        };
        // The local date, named as the UTC day of its midnight.
        match ts
            .to_zoned(tz.clone())
            .date()
            .to_zoned(jiff::tz::TimeZone::UTC)
        {
            Ok(midnight) => utc_day(midnight.timestamp().as_millisecond()),
            Err(_) => utc_day(at),
        }
    }
}

/// One row's owner: a value (or `""`) per [`DIMENSIONS`] entry.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct SpendDims(pub [String; 8]);

/// A dimension's value with its control characters dropped.
pub fn clean(value: &str) -> String {
    value.chars().filter(|c| !c.is_control()).collect()
}

/// Separates the dimensions in a row's text form: a control character no
/// attribute holds once [`SpendDims::new`] has cleaned it.
const SEP: char = '\u{1f}';

impl SpendDims {
    /// Control characters are dropped, so a value can never break the
    /// row's text form or a store record it travels in.
    pub fn new(values: [Option<&str>; 8]) -> SpendDims {
        SpendDims(values.map(|v| clean(v.unwrap_or(""))))
    }

    /// The row that rows past a day's cap are folded into.
    pub fn other() -> SpendDims {
        SpendDims(std::array::from_fn(|_| "other".to_string()))
    }

    pub fn get(&self, dimension: &str) -> Option<&str> {
        DIMENSIONS
            .iter()
            .position(|d| *d == dimension)
            .map(|i| self.0[i].as_str())
    }

    pub fn to_text(&self) -> String {
        self.0.join(&SEP.to_string())
    }

    pub fn from_text(text: &str) -> Option<SpendDims> {
        let parts: Vec<&str> = text.split(SEP).collect();
        let parts: [&str; 8] = parts.try_into().ok()?;
        Some(SpendDims(parts.map(str::to_string)))
    }
}

/// What a set of calls used. Every field adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SpendEntry {
    pub requests: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub images: i64,
    pub video_us: i64,
    pub audio_us: i64,
    pub spend_pico: i128,
}

impl SpendEntry {
    /// The fields as integers, in a fixed order, for a store's text forms.
    pub const FIELDS: [&'static str; 9] = [
        "requests",
        "input_tokens",
        "cached_input_tokens",
        "output_tokens",
        "reasoning_tokens",
        "images",
        "video_us",
        "audio_us",
        "spend_pico",
    ];

    pub fn values(&self) -> [i128; 9] {
        [
            self.requests.into(),
            self.input_tokens.into(),
            self.cached_input_tokens.into(),
            self.output_tokens.into(),
            self.reasoning_tokens.into(),
            self.images.into(),
            self.video_us.into(),
            self.audio_us.into(),
            self.spend_pico,
        ]
    }

    pub fn from_values(v: [i128; 9]) -> SpendEntry {
        let small = |x: i128| i64::try_from(x).unwrap_or(if x < 0 { i64::MIN } else { i64::MAX });
        SpendEntry {
            requests: small(v[0]),
            input_tokens: small(v[1]),
            cached_input_tokens: small(v[2]),
            output_tokens: small(v[3]),
            reasoning_tokens: small(v[4]),
            images: small(v[5]),
            video_us: small(v[6]),
            audio_us: small(v[7]),
            spend_pico: v[8],
        }
    }

    pub fn add(&mut self, other: &SpendEntry) {
        let mut v = self.values();
        for (a, b) in v.iter_mut().zip(other.values()) {
            *a = a.saturating_add(b);
        }
        *self = SpendEntry::from_values(v);
    }

    pub fn negated(&self) -> SpendEntry {
        SpendEntry::from_values(self.values().map(|x| -x))
    }

    pub fn is_zero(&self) -> bool {
        self.values().iter().all(|v| *v == 0)
    }

    /// Spend in USD, exact.
    /// Spend in USD, exact (saturating far past any real total).
    pub fn spend(&self) -> Decimal {
        Decimal::try_from_i128_with_scale(self.spend_pico, 12)
            .unwrap_or(if self.spend_pico < 0 {
                Decimal::MIN
            } else {
                Decimal::MAX
            })
            .normalize()
    }

    /// Text form, the [`FIELDS`](Self::FIELDS) in order, space-separated.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (i, v) in self.values().iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            let _ = write!(out, "{v}");
        }
        out
    }

    pub fn from_text(text: &str) -> Option<SpendEntry> {
        let values: Vec<i128> = text
            .split(' ')
            .map(|t| t.parse().ok())
            .collect::<Option<_>>()?;
        Some(SpendEntry::from_values(values.try_into().ok()?))
    }
}

/// USD in picodollars, rounded half away from zero past the twelfth
/// decimal (only a price with more than six decimals per million tokens
/// gets there).
pub fn to_pico(usd: Decimal) -> i128 {
    whole(usd, 1_000_000_000_000)
}

/// Seconds in microseconds, rounded the same way.
pub fn to_micros(seconds: Decimal) -> i64 {
    i64::try_from(whole(seconds, 1_000_000)).unwrap_or(i64::MAX)
}

/// `x * per` as a whole number; saturates where a Decimal cannot hold it.
fn whole(x: Decimal, per: i64) -> i128 {
    match x.checked_mul(Decimal::from(per)) {
        Some(v) => {
            let v =
                v.round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
            v.mantissa() / 10i128.pow(v.scale())
        }
        None if x.is_sign_negative() => i128::MIN,
        None => i128::MAX,
    }
}

/// A change to one row of one day's account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendDelta {
    pub day: Day,
    pub dims: SpendDims,
    /// Settled usage, or an estimate not (yet) settled.
    pub settled: bool,
    pub entry: SpendEntry,
}

/// One row of one day's account, as read back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpendRow {
    pub day: Day,
    pub dims: SpendDims,
    pub settled: SpendEntry,
    pub estimated: SpendEntry,
}

/// One day's account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpendDay {
    pub day: Day,
    pub rows: Vec<SpendRow>,
    /// Distinct rows that arrived past the day's cap and were folded into
    /// the `other` row (about, on Redis: counted with a HyperLogLog).
    pub folded_rows: u64,
}

/// How the account is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendBounds {
    /// Distinct rows a day keeps; later rows fold into `other`.
    pub max_rows_per_day: usize,
    /// How long a day's account is kept after the day, in milliseconds.
    pub retention: Millis,
}

impl Default for SpendBounds {
    fn default() -> Self {
        SpendBounds {
            max_rows_per_day: 10_000,
            retention: 400 * 86_400_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip() {
        let dims = SpendDims::new([
            Some("gpt-4o"),
            None,
            Some("gro\twth\n"),
            None,
            None,
            None,
            None,
            Some("text"),
        ]);
        assert_eq!(dims.0[2], "growth");
        assert_eq!(SpendDims::from_text(&dims.to_text()), Some(dims));
        let entry = SpendEntry {
            requests: 2,
            spend_pico: 52_500_000_000,
            ..Default::default()
        };
        assert_eq!(SpendEntry::from_text(&entry.to_text()), Some(entry));
        assert_eq!(entry.spend().to_string(), "0.0525");
    }

    #[test]
    fn days_are_cut_at_local_midnight_through_dst() {
        let berlin = DayCalendar::named("Europe/Berlin").unwrap();
        let day = |y: i16, m: i8, d: i8| {
            let midnight = jiff::civil::date(y, m, d)
                .to_zoned(jiff::tz::TimeZone::UTC)
                .unwrap();
            utc_day(midnight.timestamp().as_millisecond())
        };
        let at = |y: i16, m: i8, d: i8, hh: i64, mm: i64| {
            day(y, m, d) * 86_400_000 + hh * 3_600_000 + mm * 60_000
        };
        // 23:30 UTC on 1 December is 00:30 on the 2nd in Berlin (UTC+1).
        assert_eq!(berlin.day(at(2026, 12, 1, 23, 30)), day(2026, 12, 2));
        assert_eq!(
            DayCalendar::utc().day(at(2026, 12, 1, 23, 30)),
            day(2026, 12, 1)
        );
        // Summer time (UTC+2): 22:30 UTC is already the next day.
        assert_eq!(berlin.day(at(2026, 7, 1, 22, 30)), day(2026, 7, 2));
        assert_eq!(berlin.day(at(2026, 7, 1, 21, 30)), day(2026, 7, 1));
        // 29 March 2026 has 23 hours in Berlin: it starts at 23:00 UTC on
        // the 28th and ends at 22:00 UTC on the 29th.
        assert_eq!(berlin.day(at(2026, 3, 28, 23, 0)), day(2026, 3, 29));
        assert_eq!(berlin.day(at(2026, 3, 29, 21, 59)), day(2026, 3, 29));
        assert_eq!(berlin.day(at(2026, 3, 29, 22, 0)), day(2026, 3, 30));
        assert!(DayCalendar::named("Mars/Olympus").is_err());
        assert_eq!(berlin.name(), "Europe/Berlin");
    }

    #[test]
    fn usd_converts_to_picodollars_exactly() {
        assert_eq!(to_pico("0.0000001".parse().unwrap()), 100_000);
        assert_eq!(
            to_pico(Decimal::from_scientific("2.5e-6").unwrap()),
            2_500_000
        );
        assert_eq!(to_pico(Decimal::new(15, 1)), 1_500_000_000_000);
        assert_eq!(to_micros(Decimal::new(25, 1)), 2_500_000);
    }
}
