//! Spend reports: the account of settled usage, grouped by any of its
//! dimensions and filtered, as `tollgate spend` prints it and `GET
//! /v1/spend` returns it. Pure: it reads days the store already gave.

use std::collections::BTreeMap;
use std::fmt::Write;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tollgate_core::engine::window::{civil_from_days, days_from_civil};
use tollgate_core::store::spend::{Day, DIMENSIONS};
use tollgate_core::store::{SpendDay, SpendEntry};

/// The longest span one report covers.
pub const MAX_DAYS: i64 = 400;

/// What to report: days `from` to `to` (both included), grouped by `by`,
/// keeping only rows whose dimensions match every filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendQuery {
    pub from: Day,
    pub to: Day,
    /// Indices into [`DIMENSIONS`].
    pub by: Vec<usize>,
    pub filters: Vec<(usize, String)>,
}

impl SpendQuery {
    /// `from` and `to` as `YYYY-MM-DD`; `by` as `model,team`; each filter
    /// as `team=growth`.
    pub fn parse(from: &str, to: &str, by: &str, filters: &[String]) -> Result<SpendQuery, String> {
        let from = parse_day(from)?;
        let to = parse_day(to)?;
        if to < from {
            return Err(format!(
                "--to ({}) is before --from ({})",
                day_text(to),
                day_text(from)
            ));
        }
        if to - from >= MAX_DAYS {
            return Err(format!("a report covers at most {MAX_DAYS} days"));
        }
        let by = by
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(dimension)
            .collect::<Result<Vec<_>, _>>()?;
        let filters = filters
            .iter()
            .flat_map(|f| f.split(','))
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(|f| {
                let (name, value) = f
                    .split_once('=')
                    .ok_or_else(|| format!("{f:?} is not a filter such as team=growth"))?;
                Ok((dimension(name.trim())?, value.trim().to_string()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(SpendQuery {
            from,
            to,
            by,
            filters,
        })
    }
}

fn dimension(name: &str) -> Result<usize, String> {
    DIMENSIONS.iter().position(|d| *d == name).ok_or_else(|| {
        format!(
            "unknown dimension {name:?}; the account is kept by {}",
            DIMENSIONS.join(", ")
        )
    })
}

/// `YYYY-MM-DD` as a day number.
pub fn parse_day(text: &str) -> Result<Day, String> {
    let bad = || format!("{text:?} is not a date such as 2026-12-01");
    let mut parts = text.trim().splitn(3, '-');
    let mut next = || parts.next().ok_or_else(bad);
    let (y, m, d) = (next()?, next()?, next()?);
    let y: i64 = y.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    let d: u32 = d.parse().map_err(|_| bad())?;
    let day = days_from_civil(y, m, d);
    if !(1970..=9999).contains(&y) || civil_from_days(day) != (y, m, d) {
        return Err(bad());
    }
    Ok(day)
}

pub fn day_text(day: Day) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// One entry as reports show it: whole counts, and exact decimals (as
/// strings, never floats) for seconds and dollars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EntryReport {
    pub requests: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub images: i64,
    pub video_seconds: String,
    pub audio_seconds: String,
    pub spend_usd: String,
}

impl From<&SpendEntry> for EntryReport {
    fn from(e: &SpendEntry) -> EntryReport {
        let seconds = |us: i64| Decimal::new(us, 6).normalize().to_string();
        EntryReport {
            requests: e.requests,
            input_tokens: e.input_tokens,
            cached_input_tokens: e.cached_input_tokens,
            output_tokens: e.output_tokens,
            reasoning_tokens: e.reasoning_tokens,
            images: e.images,
            video_seconds: seconds(e.video_us),
            audio_seconds: seconds(e.audio_us),
            spend_usd: e.spend().to_string(),
        }
    }
}

/// One group of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendGroup {
    /// The group's value of each `by` dimension, in `by` order.
    pub group: BTreeMap<String, String>,
    /// Usage settled at the end of its call.
    pub settled: EntryReport,
    /// Estimates that were never settled (the call was not metered, its
    /// caller never settled it, or it is still running).
    pub estimated: EntryReport,
}

/// `GET /v1/spend`'s body, and what `tollgate spend --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendReport {
    pub from: String,
    pub to: String,
    /// Where days are cut: `UTC`, or the server's `--spend-timezone`.
    pub timezone: String,
    pub by: Vec<String>,
    pub filters: BTreeMap<String, String>,
    pub groups: Vec<SpendGroup>,
    pub total: SpendGroup,
    /// Rows that arrived past a day's row cap and were counted in the
    /// `other` row, summed over the days (about, on Redis).
    pub folded_rows: u64,
}

/// Groups and filters `days` (cut in `timezone`) as `query` asks.
pub fn report(days: &[SpendDay], query: &SpendQuery, timezone: &str) -> SpendReport {
    let mut groups: BTreeMap<Vec<String>, (SpendEntry, SpendEntry)> = BTreeMap::new();
    let mut total = (SpendEntry::default(), SpendEntry::default());
    let mut folded = 0;
    for day in days
        .iter()
        .filter(|d| (query.from..=query.to).contains(&d.day))
    {
        folded += day.folded_rows;
        for row in &day.rows {
            if !query.filters.iter().all(|(i, v)| row.dims.0[*i] == *v) {
                continue;
            }
            let key: Vec<String> = query.by.iter().map(|&i| row.dims.0[i].clone()).collect();
            let (settled, estimated) = groups.entry(key).or_default();
            settled.add(&row.settled);
            estimated.add(&row.estimated);
            total.0.add(&row.settled);
            total.1.add(&row.estimated);
        }
    }
    let names = |values: &[String]| -> BTreeMap<String, String> {
        query
            .by
            .iter()
            .zip(values)
            .map(|(&i, v)| (DIMENSIONS[i].to_string(), v.clone()))
            .collect()
    };
    SpendReport {
        from: day_text(query.from),
        to: day_text(query.to),
        timezone: timezone.to_string(),
        by: query
            .by
            .iter()
            .map(|&i| DIMENSIONS[i].to_string())
            .collect(),
        filters: query
            .filters
            .iter()
            .map(|(i, v)| (DIMENSIONS[*i].to_string(), v.clone()))
            .collect(),
        groups: groups
            .iter()
            .map(|(key, (settled, estimated))| SpendGroup {
                group: names(key),
                settled: settled.into(),
                estimated: estimated.into(),
            })
            .collect(),
        total: SpendGroup {
            group: BTreeMap::new(),
            settled: (&total.0).into(),
            estimated: (&total.1).into(),
        },
        folded_rows: folded,
    }
}

const ENTRY_COLUMNS: [&str; 9] = [
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "images",
    "video_seconds",
    "audio_seconds",
    "spend_usd",
];

fn entry_cells(e: &EntryReport) -> [String; 9] {
    [
        e.requests.to_string(),
        e.input_tokens.to_string(),
        e.cached_input_tokens.to_string(),
        e.output_tokens.to_string(),
        e.reasoning_tokens.to_string(),
        e.images.to_string(),
        e.video_seconds.clone(),
        e.audio_seconds.clone(),
        e.spend_usd.clone(),
    ]
}

impl SpendReport {
    /// One line a group: the `by` dimensions, then every settled field,
    /// then every estimated one. RFC 4180 quoting.
    pub fn to_csv(&self) -> String {
        let mut header: Vec<String> = self.by.clone();
        for side in ["settled", "estimated"] {
            header.extend(ENTRY_COLUMNS.iter().map(|c| format!("{side}_{c}")));
        }
        let mut out = csv_line(&header);
        for g in &self.groups {
            let mut cells: Vec<String> = self
                .by
                .iter()
                .map(|d| defused(g.group.get(d).cloned().unwrap_or_default()))
                .collect();
            cells.extend(entry_cells(&g.settled));
            cells.extend(entry_cells(&g.estimated));
            out.push_str(&csv_line(&cells));
        }
        out
    }

    /// The groups of a CSV made by [`SpendReport::to_csv`].
    pub fn groups_from_csv(text: &str) -> Result<Vec<SpendGroup>, String> {
        let mut lines = csv_records(text)?.into_iter();
        let header = lines.next().ok_or("an empty CSV")?;
        let by = header
            .len()
            .checked_sub(2 * ENTRY_COLUMNS.len())
            .ok_or("too few columns")?;
        lines
            .map(|cells| {
                if cells.len() != header.len() {
                    return Err(format!(
                        "a row of {} cells under {} columns",
                        cells.len(),
                        header.len()
                    ));
                }
                let entry = |c: &[String]| -> Result<EntryReport, String> {
                    let n = |s: &String| s.parse::<i64>().map_err(|e| format!("{s:?}: {e}"));
                    Ok(EntryReport {
                        requests: n(&c[0])?,
                        input_tokens: n(&c[1])?,
                        cached_input_tokens: n(&c[2])?,
                        output_tokens: n(&c[3])?,
                        reasoning_tokens: n(&c[4])?,
                        images: n(&c[5])?,
                        video_seconds: c[6].clone(),
                        audio_seconds: c[7].clone(),
                        spend_usd: c[8].clone(),
                    })
                };
                Ok(SpendGroup {
                    group: header[..by]
                        .iter()
                        .cloned()
                        .zip(cells[..by].iter().map(|c| undefused(c)))
                        .collect(),
                    settled: entry(&cells[by..by + 9])?,
                    estimated: entry(&cells[by + 9..])?,
                })
            })
            .collect()
    }

    /// For a terminal: one row a group, spend first.
    pub fn to_table(&self) -> String {
        let mut header: Vec<String> = self.by.clone();
        header.extend(
            [
                "spend_usd",
                "requests",
                "input",
                "cached",
                "output",
                "reasoning",
                "images",
                "est_spend_usd",
                "est_requests",
            ]
            .map(String::from),
        );
        let line = |label: Vec<String>, g: &SpendGroup| {
            let mut cells = label;
            cells.extend([
                g.settled.spend_usd.clone(),
                g.settled.requests.to_string(),
                g.settled.input_tokens.to_string(),
                g.settled.cached_input_tokens.to_string(),
                g.settled.output_tokens.to_string(),
                g.settled.reasoning_tokens.to_string(),
                g.settled.images.to_string(),
                g.estimated.spend_usd.clone(),
                g.estimated.requests.to_string(),
            ]);
            cells
        };
        let mut rows = vec![header];
        for g in &self.groups {
            rows.push(line(
                self.by
                    .iter()
                    .map(|d| g.group.get(d).cloned().unwrap_or_default())
                    .collect(),
                g,
            ));
        }
        let mut label = vec![String::new(); self.by.len()];
        if let Some(first) = label.first_mut() {
            *first = "total".to_string();
        }
        rows.push(line(label, &self.total));
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = format!(
            "spend from {} to {} ({} days)\n",
            self.from, self.to, self.timezone
        );
        for row in &rows {
            for (c, cell) in row.iter().enumerate() {
                let _ = write!(out, "{cell:<w$}  ", w = widths[c]);
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
        }
        if self.folded_rows > 0 {
            let _ = writeln!(
                out,
                "{} rows past a day's row cap were counted as `other`",
                self.folded_rows
            );
        }
        out
    }
}

/// A dimension value a spreadsheet would run as a formula (`=`, `+`, `-`,
/// `@`) gets a leading `'`, which spreadsheets show as text; values come
/// from requests, so they are not trusted.
fn defused(value: String) -> String {
    if value.starts_with(['=', '+', '-', '@', '\'']) {
        format!("'{value}")
    } else {
        value
    }
}

fn undefused(cell: &str) -> String {
    match cell.strip_prefix('\'') {
        Some(rest) if rest.starts_with(['=', '+', '-', '@', '\'']) => rest.to_string(),
        _ => cell.to_string(),
    }
}

fn csv_line(cells: &[String]) -> String {
    let mut out = String::new();
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if cell.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&cell.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(cell);
        }
    }
    out.push_str("\r\n");
    out
}

fn csv_records(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') if cell.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut cell)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut cell));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => cell.push(c),
        }
    }
    if quoted {
        return Err("a quoted cell is not closed".to_string());
    }
    if !cell.is_empty() || !record.is_empty() {
        record.push(cell);
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_and_refuse_what_they_cannot_read() {
        let q = SpendQuery::parse(
            "2026-12-01",
            "2026-12-31",
            "model, team",
            &["team=growth".into()],
        )
        .unwrap();
        assert_eq!(q.to - q.from, 30);
        assert_eq!(q.by, vec![0, 2]);
        assert_eq!(q.filters, vec![(2, "growth".to_string())]);
        assert!(SpendQuery::parse("2026-02-30", "2026-03-01", "", &[]).is_err());
        assert!(SpendQuery::parse("2026-12-02", "2026-12-01", "", &[]).is_err());
        assert!(SpendQuery::parse("2026-12-01", "2026-12-01", "colour", &[])
            .unwrap_err()
            .contains("model"));
        assert!(SpendQuery::parse("2026-12-01", "2026-12-01", "", &["team".into()]).is_err());
    }

    #[test]
    fn csv_defuses_formulas_and_reads_them_back() {
        for v in ["=HYPERLINK(\"x\")", "+1", "-2", "@sum", "'quoted", "plain"] {
            assert_eq!(undefused(&defused(v.to_string())), v);
            assert!(!defused(v.to_string()).starts_with(['=', '+', '-', '@']));
        }
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let cells = vec![
            "a,b".to_string(),
            "say \"hi\"".to_string(),
            "plain".to_string(),
        ];
        let line = csv_line(&cells);
        assert_eq!(csv_records(&line).unwrap(), vec![cells]);
    }
}
