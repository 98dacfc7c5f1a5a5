//! A rule's `limit`: exactly one unit with its amount, and the window it is
//! counted over.

use rust_decimal::Decimal;

use super::{parse_duration, Reader};
use crate::policy::model::*;
use crate::policy::yaml::{Node, Value};

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
            let Some(u) = Unit::parse(name) else {
                self.error(
                    k.pos,
                    format!(
                        "unknown field `{name}` in limit; expected `window` and one unit of: {}",
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
