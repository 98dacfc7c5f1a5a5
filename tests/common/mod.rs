#![allow(dead_code)]

use std::sync::Arc;

use tollgate::engine::window::days_from_civil;
use tollgate::gate::{Gate, GateConfig, ManualClock};
use tollgate::policy::{compile_sources, CompiledPolicy, LoadErrors, SourceFile};
use tollgate::store::{CounterStore, MemoryStore};

pub fn sources(files: &[(&str, &str)]) -> Vec<SourceFile> {
    files
        .iter()
        .map(|(name, text)| SourceFile {
            name: name.to_string(),
            text: text.to_string(),
        })
        .collect()
}

pub fn compile(files: &[(&str, &str)]) -> Result<CompiledPolicy, LoadErrors> {
    compile_sources(&sources(files))
}

pub fn policy(yaml: &str) -> CompiledPolicy {
    match compile(&[("p.yaml", yaml)]) {
        Ok(p) => p,
        Err(e) => panic!("policy should load:\n{e}"),
    }
}

/// Milliseconds at a UTC date and time.
pub fn at(y: i64, m: u32, d: u32, hh: i64, mm: i64) -> i64 {
    days_from_civil(y, m, d) * 86_400_000 + hh * 3_600_000 + mm * 60_000
}

pub fn gate_with(
    policy: CompiledPolicy,
    store: Arc<dyn CounterStore>,
    clock: Arc<ManualClock>,
) -> Gate {
    Gate::new(policy, store, clock, GateConfig::default())
}

pub fn memory_gate(yaml: &str, now: i64) -> (Gate, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(now));
    let gate = gate_with(
        policy(yaml),
        Arc::new(MemoryStore::default()),
        clock.clone(),
    );
    (gate, clock)
}
