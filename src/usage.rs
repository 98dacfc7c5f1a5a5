//! `tollgate usage`: counters against their limits, as a terminal table
//! or JSON, from a running server (`GET /v1/usage` on its HTTP port) or
//! straight from the counter store.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use hyper::body::Bytes;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::http_client::{self, Target};
use tollgate_core::engine::window::{format_in, format_utc};
use tollgate_core::engine::CounterReport;

/// How long `fetch` waits for a server's answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// One counter, as `/v1/usage` serves it and `usage --json` prints it.
/// Amounts are exact decimals as strings (USD for spend).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    pub rule: String,
    pub scope: String,
    pub unit: String,
    pub window: String,
    pub used: String,
    /// Counted in Redis but held unspent in replicas' leases: neither used
    /// nor remaining. Absent when nothing is leased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased: Option<String>,
    pub limit: String,
    pub remaining: String,
    /// Unix seconds; absent when the counter never resets.
    pub resets_at: Option<i64>,
    /// The reset instant in RFC 3339 in the window's own time zone, with
    /// its offset (`Z` for UTC windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at_local: Option<String>,
    pub enforced: bool,
}

impl From<&CounterReport> for UsageRow {
    fn from(c: &CounterReport) -> UsageRow {
        UsageRow {
            rule: c.rule.clone(),
            scope: c.scope.clone(),
            unit: c.unit.name().to_string(),
            window: c.window.to_string(),
            used: c.used.normalize().to_string(),
            leased: (!c.leased.is_zero()).then(|| c.leased.normalize().to_string()),
            limit: c.limit.normalize().to_string(),
            remaining: c.remaining.normalize().to_string(),
            resets_at: c.resets_at.map(|t| t.div_euclid(1000)),
            resets_at_local: c.resets_at.map(|t| format_in(c.window, t)),
            enforced: c.enforced,
        }
    }
}

/// The `/v1/pricing/missing` answer (`tollgate pricing missing`): models
/// one server saw in requests since it started, with no price under the
/// policy in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingReport {
    pub policy_version: String,
    /// Most requested first.
    pub models: Vec<MissingModel>,
    /// Requests that named models past the `max_models` kept.
    pub overflow: u64,
    pub max_models: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingModel {
    pub model: String,
    pub requests: u64,
    /// Unix milliseconds.
    pub first_seen: i64,
    pub last_seen: i64,
}

/// The `/v1/usage` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    pub policy_version: String,
    /// From a server: the distinct (rule, scope) pairs it tracks, its cap,
    /// and how many counter reports found the tracked set full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes_tracked: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes_max: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes_overflowed: Option<u64>,
    pub counters: Vec<UsageRow>,
}

const BAR_WIDTH: usize = 20;

/// Used as a share of the limit, in percent; `None` for a zero limit.
pub fn percent(row: &UsageRow) -> Option<f64> {
    let used: Decimal = row.used.parse().ok()?;
    let limit: Decimal = row.limit.parse().ok()?;
    if limit.is_zero() {
        return None;
    }
    (used * Decimal::from(100) / limit).to_f64()
}

fn bar(pct: Option<f64>) -> String {
    let filled = pct
        .map(|p| {
            ((p / 100.0) * BAR_WIDTH as f64)
                .round()
                .clamp(0.0, BAR_WIDTH as f64) as usize
        })
        .unwrap_or(0);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(BAR_WIDTH - filled))
}

fn amount(unit: &str, value: &str) -> String {
    if unit == "spend" {
        format!("${value}")
    } else {
        value.to_string()
    }
}

/// A table for people: one line per counter with a bar and the percent.
pub fn table(rows: &[UsageRow]) -> String {
    if rows.is_empty() {
        return "no counters\n".to_string();
    }
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let pct = percent(r);
            [
                r.rule.clone(),
                r.scope.clone(),
                match &r.leased {
                    // Leased budget is neither spent nor free: shown apart.
                    Some(leased) => format!(
                        "{} / {} (+{} leased)",
                        amount(&r.unit, &r.used),
                        amount(&r.unit, &r.limit),
                        amount(&r.unit, leased)
                    ),
                    None => format!(
                        "{} / {}",
                        amount(&r.unit, &r.used),
                        amount(&r.unit, &r.limit)
                    ),
                },
                format!("{} {}", r.unit, r.window),
                bar(pct),
                pct.map(|p| format!("{p:.1}%"))
                    .unwrap_or_else(|| "-".to_string()),
                match (&r.resets_at_local, r.resets_at) {
                    (Some(local), _) => local.clone(),
                    (None, Some(t)) => format_utc(t * 1000),
                    (None, None) => "never".to_string(),
                }
                .to_string()
                    + if r.enforced { "" } else { " (soft)" },
            ]
        })
        .collect();
    let header = [
        "RULE",
        "SCOPE",
        "USED / LIMIT",
        "UNIT",
        "USAGE",
        "%",
        "RESETS",
    ];
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: &[String]| {
        let mut text = String::new();
        for (i, (c, w)) in cols.iter().zip(widths).enumerate() {
            // Numbers read best right-aligned.
            if i == 2 || i == 5 {
                let _ = write!(text, "{c:>w$}  ");
            } else {
                let _ = write!(text, "{c:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.map(str::to_string));
    for row in &cells {
        line(row);
    }
    out
}

/// `GET /v1/usage` on a running server's HTTP listener (`https://` with
/// `tls` when given, else the public web roots).
pub async fn fetch(
    server: &Target,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<UsageReport, String> {
    let answer = http_client::send_with(
        server,
        tls,
        Method::GET,
        "/v1/usage",
        &[],
        Bytes::new(),
        FETCH_TIMEOUT,
    )
    .await?;
    if answer.status != 200 {
        return Err(format!(
            "HTTP {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body).trim()
        ));
    }
    serde_json::from_slice(&answer.body).map_err(|e| format!("bad /v1/usage answer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(used: &str, limit: &str) -> UsageRow {
        UsageRow {
            rule: "r".into(),
            scope: "team=growth".into(),
            unit: "spend".into(),
            window: "daily".into(),
            used: used.into(),
            leased: None,
            limit: limit.into(),
            remaining: "0".into(),
            resets_at: None,
            resets_at_local: None,
            enforced: true,
        }
    }

    #[test]
    fn bar_and_percent() {
        assert_eq!(percent(&row("2.5", "10")), Some(25.0));
        assert_eq!(percent(&row("1", "0")), None);
        assert_eq!(
            bar(Some(25.0)),
            format!("[{}{}]", "#".repeat(5), ".".repeat(15))
        );
        assert_eq!(bar(Some(250.0)), format!("[{}]", "#".repeat(20)));
        let t = table(&[row("2.5", "10")]);
        assert!(t.contains("$2.5 / $10"), "{t}");
        assert!(t.contains("25.0%"), "{t}");
    }
}
