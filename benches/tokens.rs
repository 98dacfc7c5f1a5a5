//! Exact input token counts: tokens per second of each OpenAI encoding on
//! prompts of 2 KB, 10 KB, 64 KiB (the size past which the count falls
//! back to the approximation) and 1 MB, and what an exact count adds to a
//! decision. Run with `cargo bench --bench tokens`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate_core::engine::tokens::{self, Prompt};
use tollgate_core::engine::{Attributes, Estimate};
use tollgate_core::gate::{CheckInput, Gate, GateConfig, ManualClock};
use tollgate_core::policy::{compile_sources, CompiledPolicy, SourceFile, Tokenizer};
use tollgate_core::store::MemoryStore;

/// Prompt-like text of `bytes` bytes: English prose over a vocabulary of a
/// few hundred words, with capitals, numbers, punctuation, code, JSON and
/// some Japanese, Chinese, Korean, Cyrillic, Arabic and emoji, drawn by a
/// seeded generator so that every seed gives other text.
fn prompt(bytes: usize, seed: u64) -> String {
    const WORDS: &str = "the of and to in is that for it as was with be by on not he this are \
        or his from at which but have an they you were her she there one all we their been has \
        will would more if no when so what can said who may about out up them into then some \
        could time these two than other only new like do very its first also after any over \
        most where my made me many people way should years now such just our how back much \
        before must well know through down because each work even take good three long here \
        under see own life world still last city never place between state high day great help \
        government think number against school old big end does company power while system both \
        small another group public set country point hand part off every fact far home little \
        problem service since budget invoice quarterly revenue forecast customer report summary";
    const EXTRA: [&str; 24] = [
        "東京",
        "データ",
        "分析",
        "中文",
        "数据",
        "한국어",
        "😀",
        "👍🏽",
        "—",
        "€1,299.00",
        "3.14159",
        "x_i",
        "fn",
        "{",
        "}",
        "()",
        "=>",
        "\\n",
        "naïve",
        "Straße",
        "Ёжик",
        "مرحبا",
        "{\"region\": \"EMEA\"}",
        "let total: u64 = xs.iter().sum();",
    ];
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut s = String::with_capacity(bytes + 64);
    let mut r = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while s.len() < bytes {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        if r.is_multiple_of(11) {
            s.push_str(EXTRA[(r >> 8) as usize % EXTRA.len()]);
        } else if r.is_multiple_of(13) {
            s.push_str(&(r % 100_000).to_string());
        } else {
            let w = words[(r >> 8) as usize % words.len()];
            if r.is_multiple_of(7) {
                let mut c = w.chars();
                if let Some(first) = c.next() {
                    s.extend(first.to_uppercase());
                    s.push_str(c.as_str());
                }
            } else {
                s.push_str(w);
            }
        }
        s.push(match r % 23 {
            0 => '.',
            1 => ',',
            2 => '\n',
            _ => ' ',
        });
    }
    let mut end = bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn counting(c: &mut Criterion) {
    tokens::warm();
    for (label, bytes, texts) in [
        ("2KB", 2_000, 64),
        ("10KB", 10_000, 16),
        ("64KiB", 64 * 1024, 4),
        ("1MB", 1_000_000, 1),
    ] {
        // Several texts in turn, so that the tokenizer's per-thread piece
        // cache sees what a server sees: other prompts, the same language.
        let prompts: Vec<String> = (0..texts).map(|i| prompt(bytes, i as u64 + 1)).collect();
        for tokenizer in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
            let total: u64 = prompts
                .iter()
                .map(|p| tokens::count_text(tokenizer, p))
                .sum();
            let mut group = c.benchmark_group(format!("count/{tokenizer}"));
            // Tokens per second: criterion's elements are the tokens of
            // one prompt, on average.
            group.throughput(Throughput::Elements(total / texts as u64));
            if bytes >= 64 * 1024 {
                group.sample_size(20);
            }
            let mut i = 0usize;
            group.bench_function(label, |b| {
                b.iter(|| {
                    i = (i + 1) % prompts.len();
                    tokens::count_text(tokenizer, black_box(&prompts[i]))
                })
            });
            group.finish();
        }
    }
}

/// A small policy of the usual shape: a spend budget per team, a token
/// cap per workflow, a request cap per key.
fn policy() -> CompiledPolicy {
    let yaml = "\
pricing:
  unpriced_models: reject
  models:
    gpt-4o: { input_per_mtok: 2.5, output_per_mtok: 10 }
    claude-sonnet-4: { input_per_mtok: 3, output_per_mtok: 15 }
rules:
  - id: team-spend
    match: { team: \"*\" }
    per: [team]
    limit: { spend: 1000000, window: monthly }
  - id: workflow-tokens
    match: { workflow: \"*\" }
    per: [workflow]
    limit: { tokens: 100000000000, window: daily }
  - id: key-requests
    match: { key: \"*\" }
    per: [key]
    limit: { requests: 1000000000, window: daily }
";
    compile_sources(&[SourceFile {
        name: "bench.yaml".to_string(),
        text: yaml.to_string(),
    }])
    .unwrap_or_else(|e| panic!("{e}"))
}

fn input(model: &str, estimate: Estimate) -> CheckInput {
    CheckInput {
        attributes: Attributes {
            key: Some("key-1".to_string()),
            team: Some("growth".to_string()),
            workflow: Some("support".to_string()),
            model: Some(model.to_string()),
            ..Default::default()
        },
        estimate,
        ..Default::default()
    }
}

/// One decision (gate check on the embedded store) for a 2 KB prompt:
/// with the approximation alone (the estimate as before exact counts),
/// with the prompt kept but a model that is approximated, and counted
/// exactly for gpt-4o. Each check gets a prompt it has not counted yet.
fn decision(c: &mut Criterion) {
    tokens::warm();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gate = Gate::new(
        policy(),
        Arc::new(MemoryStore::default()),
        Arc::new(ManualClock::new(1_795_000_000_000)),
        GateConfig::default(),
    );
    let texts: Vec<String> = (0..64).map(|i| prompt(2_000, i + 100)).collect();
    let estimate = |text: &str, keep: bool| Estimate {
        input_tokens: Some((text.chars().count() as u64).div_ceil(4)),
        output_tokens: Some(500),
        prompt: keep.then(|| Prompt::new(vec![text.into()], vec!["user".into()], 1)),
        ..Default::default()
    };
    let mut group = c.benchmark_group("decision-2KB-prompt");
    for (label, model, keep) in [
        ("approximated-no-prompt", "gpt-4o", false),
        ("approximated-claude", "claude-sonnet-4", true),
        ("exact-gpt-4o", "gpt-4o", true),
    ] {
        let mut i = 0usize;
        group.bench_function(label, |b| {
            b.iter(|| {
                i = (i + 1) % texts.len();
                let d = rt
                    .block_on(gate.check(input(model, estimate(&texts[i], keep))))
                    .unwrap();
                black_box(d)
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3));
    targets = counting, decision
}
criterion_main!(benches);
