//! The spend account: per day, one hash of rows, one of values and one
//! HyperLogLog of folded rows, all under the day's hash tag so that one
//! `spend.lua` call adds a whole batch atomically, on a cluster too.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::RedisStore;
use crate::policy::hex;
use crate::store::spend::{
    Day, SpendBounds, SpendDay, SpendDelta, SpendDims, SpendEntry, SpendRow,
};
use crate::store::*;

const PICO_PER_MICRO: i128 = 1_000_000;

/// Deltas one `spend.lua` call adds at most.
const MAX_DELTAS_A_CALL: usize = 500;

impl RedisStore {
    fn spend_keys(&self, day: Day) -> [String; 3] {
        let p = &self.prefix;
        [
            format!("{p}sp:{{d{day}}}rows"),
            format!("{p}sp:{{d{day}}}values"),
            format!("{p}sp:{{d{day}}}folded"),
        ]
    }

    fn spend_batch_key(&self, day: Day, batch: &str) -> String {
        format!("{}sp:{{d{day}}}batch:{batch}", self.prefix)
    }

    pub(super) async fn add_spend(
        &self,
        batch: &str,
        deltas: &[SpendDelta],
        bounds: SpendBounds,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut by_day: std::collections::BTreeMap<Day, Vec<&SpendDelta>> = Default::default();
        for d in deltas {
            by_day.entry(d.day).or_default().push(d);
        }
        let other = SpendDims::other().to_text();
        for (day, deltas) in by_day {
            // Each script call stays short: Redis runs nothing else while
            // it runs. A chunk is added once, by its own id.
            for (n, chunk) in deltas.chunks(MAX_DELTAS_A_CALL).enumerate() {
                let mut inv = self.spend.prepare_invoke();
                for key in self.spend_keys(day) {
                    inv.key(key);
                }
                inv.key(self.spend_batch_key(day, &format!("{batch}-{n}")));
                // Kept its retention past the day's end (a day in a time
                // zone ends at most a day after its UTC namesake).
                let lifetime = ((day + 2) * 86_400_000 - now).max(1) + bounds.retention;
                inv.arg(bounds.max_rows_per_day).arg(lifetime).arg(&other);
                for d in chunk {
                    let dims = d.dims.to_text();
                    inv.arg(row_id(&dims))
                        .arg(dims)
                        .arg(if d.settled { "s" } else { "e" });
                    let v = d.entry.values();
                    for x in &v[..8] {
                        inv.arg(x.to_string());
                    }
                    inv.arg(v[8].div_euclid(PICO_PER_MICRO).to_string())
                        .arg(v[8].rem_euclid(PICO_PER_MICRO).to_string());
                }
                self.invoke::<i64>(&inv).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn read_spend(&self, from: Day, to: Day) -> Result<Vec<SpendDay>, StoreError> {
        let mut days = Vec::new();
        for day in from..=to.min(from.saturating_add(3_660)) {
            let [rows_key, values_key, folded_key] = self.spend_keys(day);
            let rows: HashMap<String, String> =
                self.query(::redis::cmd("HGETALL").arg(&rows_key)).await?;
            if rows.is_empty() {
                continue;
            }
            let values: HashMap<String, String> =
                self.query(::redis::cmd("HGETALL").arg(&values_key)).await?;
            let folded: u64 = self.query(::redis::cmd("PFCOUNT").arg(&folded_key)).await?;
            let mut sums: HashMap<&str, [[i128; 10]; 2]> = HashMap::new();
            for (field, value) in &values {
                let bad = || {
                    StoreError::Unavailable(format!("spend account field {field:?} does not read"))
                };
                let (row, rest) = field.rsplit_once(':').ok_or_else(bad)?;
                let (kind, index) = rest.split_at(1);
                let kind = match kind {
                    "s" => 0,
                    "e" => 1,
                    _ => return Err(bad()),
                };
                let index: usize = index.parse().map_err(|_| bad())?;
                let value: i128 = value.parse().map_err(|_| bad())?;
                let slot = sums.entry(row).or_default();
                *slot[kind].get_mut(index).ok_or_else(bad)? = value;
            }
            let entry = |v: &[i128; 10]| {
                let mut e: [i128; 9] = [0; 9];
                e[..8].copy_from_slice(&v[..8]);
                e[8] = v[8] * PICO_PER_MICRO + v[9];
                SpendEntry::from_values(e)
            };
            let mut out: Vec<SpendRow> = rows
                .iter()
                .filter_map(|(id, dims)| {
                    let v = sums.get(id.as_str()).copied().unwrap_or_default();
                    Some(SpendRow {
                        day,
                        dims: SpendDims::from_text(dims)?,
                        settled: entry(&v[0]),
                        estimated: entry(&v[1]),
                    })
                })
                .collect();
            out.sort_by(|a, b| a.dims.cmp(&b.dims));
            days.push(SpendDay {
                day,
                rows: out,
                folded_rows: folded,
            });
        }
        Ok(days)
    }
}

/// A row's id: a hash of its dimensions, short enough to repeat in every
/// value field.
fn row_id(dims: &str) -> String {
    hex(&Sha256::digest(dims.as_bytes())[..8])
}
