//! A rule's `limit`: exactly one unit with its amount, and the window it is
//! counted over.

use rust_decimal::Decimal;

use super::{parse_duration, Reader};
use crate::policy::model::*;
use crate::policy::yaml::{Node, Pos, Value};

impl Reader<'_> {
    pub(super) fn limit(&mut self, node: &Node) -> Option<Limit> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                format!("`limit` must be a mapping, found {}", node.kind()),
            );
            return None;
        };
        let mut unit: Option<(Unit, Decimal)> = None;
        // A unit whose amount was invalid still counts as named.
        let mut unit_seen: Option<Unit> = None;
        let mut window = None;
        let mut window_pos = node.pos;
        // `timezone` and `anchor`, read once the window is known.
        let mut local: Vec<(&str, &Node)> = Vec::new();
        let mut ok = true;
        for (k, v) in entries {
            let Some(name) = self.key_name(k) else {
                ok = false;
                continue;
            };
            if name == "window" {
                window_pos = v.pos;
                window = self.window(v);
                ok &= window.is_some();
                continue;
            }
            if name == "timezone" || name == "anchor" {
                if local.iter().any(|(n, _)| *n == name) {
                    self.error(k.pos, format!("field `{name}` is given twice in limit"));
                    ok = false;
                } else {
                    local.push((name, v));
                }
                continue;
            }
            let Some(u) = Unit::parse(name) else {
                self.error(
                    k.pos,
                    format!(
                        "unknown field `{name}` in limit; expected `window` (with `timezone` \
                         and `anchor`) and one unit of: {}",
                        Unit::ALL.map(Unit::name).join(", ")
                    ),
                );
                ok = false;
                continue;
            };
            let Some(amount) = self.amount(v, name) else {
                ok = false;
                unit_seen.get_or_insert(u);
                continue;
            };
            if u != Unit::Spend && amount.fract() != Decimal::ZERO {
                self.error(v.pos, format!("a `{name}` limit must be a whole number"));
                ok = false;
            }
            if amount > Decimal::from(1_000_000_000_000i64) {
                self.error(
                    v.pos,
                    format!("a `{name}` limit above 10^12 is not supported"),
                );
                ok = false;
            }
            if let Some(first) = unit.map(|(u, _)| u).or(unit_seen) {
                self.error(
                    k.pos,
                    format!("a limit counts exactly one unit; found both `{first}` and `{name}`"),
                );
                ok = false;
            }
            unit = Some((u, amount));
        }
        let Some((unit, amount)) = unit else {
            if unit_seen.is_some() {
                return None;
            }
            self.error(
                node.pos,
                format!(
                    "`limit` names no unit; give one of: {}",
                    Unit::ALL.map(Unit::name).join(", ")
                ),
            );
            return None;
        };
        let window = match window {
            Some(w) if !local.is_empty() => {
                let w = self.localize(w, window_pos, &local);
                ok &= w.is_some();
                w
            }
            None if !local.is_empty() => {
                let (name, v) = local[0];
                self.error(
                    v.pos,
                    format!("`{name}` needs a daily, weekly or monthly `window`"),
                );
                return None;
            }
            w => w,
        };
        let window = match (unit, window) {
            (Unit::Concurrent, None | Some(Window::Lifetime)) => Window::Lifetime,
            (Unit::Concurrent, Some(_)) => {
                self.error(
                    window_pos,
                    "a `concurrent` limit counts requests in flight and takes no window",
                );
                return None;
            }
            (_, Some(w)) => w,
            (_, None) if ok => {
                self.error(node.pos, "`limit` needs a `window`");
                return None;
            }
            (_, None) => return None,
        };
        ok.then_some(Limit {
            unit,
            amount,
            window,
        })
    }

    /// A daily, weekly or monthly window put in a time zone and given an
    /// anchor. The plain UTC form (no zone or UTC, the 1st, Monday) stays
    /// `Window::Calendar`, so its counters keep their names.
    fn localize(&mut self, window: Window, pos: Pos, fields: &[(&str, &Node)]) -> Option<Window> {
        let period = match window {
            Window::Calendar(
                p @ (CalendarPeriod::Day | CalendarPeriod::Week | CalendarPeriod::Month),
            ) => p,
            other => {
                let (name, node) = fields[0];
                self.error(
                    node.pos,
                    format!(
                        "`{name}` applies to a daily, weekly or monthly window, not to {other} \
                         (window at {pos})"
                    ),
                );
                return None;
            }
        };
        let mut zone = Zone::utc();
        let mut anchor = match period {
            CalendarPeriod::Day => 0,
            _ => 1,
        };
        let mut ok = true;
        for &(name, node) in fields {
            if name == "timezone" {
                let text = self.string(node, "timezone")?;
                match Zone::get(text.trim()) {
                    Ok(z) => zone = z,
                    Err(e) => {
                        self.error(node.pos, format!("bad `timezone`: {e}"));
                        ok = false;
                    }
                }
                continue;
            }
            let text = match &node.value {
                Value::Scalar { text, .. } => text.trim().to_ascii_lowercase(),
                _ => String::new(),
            };
            match period {
                CalendarPeriod::Month => match text.parse::<u8>() {
                    Ok(day @ 1..=31) => anchor = day,
                    _ => {
                        self.error(
                            node.pos,
                            format!(
                                "bad `anchor` {text:?} for a monthly window: give the billing \
                                 day, 1 to 31 (past a short month's end, its last day)"
                            ),
                        );
                        ok = false;
                    }
                },
                CalendarPeriod::Week => {
                    let found = WEEKDAYS
                        .iter()
                        .position(|d| *d == text || (text.len() == 3 && d.starts_with(&text)));
                    match found {
                        Some(i) => anchor = i as u8 + 1,
                        None => {
                            self.error(
                                node.pos,
                                format!(
                                    "bad `anchor` {text:?} for a weekly window: give the week's \
                                     first day, one of {}",
                                    WEEKDAYS.join(", ")
                                ),
                            );
                            ok = false;
                        }
                    }
                }
                _ => {
                    self.error(
                        node.pos,
                        "a daily window takes no `anchor`: it starts at midnight in its `timezone`",
                    );
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        if zone.name() == "UTC" && anchor <= 1 {
            return Some(window);
        }
        Some(Window::Local(LocalCalendar {
            period,
            zone,
            anchor,
        }))
    }

    fn window(&mut self, node: &Node) -> Option<Window> {
        let text = self.string(node, "window")?;
        let w = match text.as_str() {
            "minute" => Window::Calendar(CalendarPeriod::Minute),
            "hour" | "hourly" => Window::Calendar(CalendarPeriod::Hour),
            "daily" | "day" => Window::Calendar(CalendarPeriod::Day),
            "weekly" | "week" => Window::Calendar(CalendarPeriod::Week),
            "monthly" | "month" => Window::Calendar(CalendarPeriod::Month),
            "none" => Window::Lifetime,
            other => match parse_duration(other) {
                Some(secs) => Window::Rolling(secs),
                None => {
                    self.error(
                        node.pos,
                        format!(
                            "bad window {other:?}: use minute, hour, daily, weekly, monthly, none, \
                             or a duration such as 30s, 10m, 24h or 7d"
                        ),
                    );
                    return None;
                }
            },
        };
        Some(w)
    }
}
