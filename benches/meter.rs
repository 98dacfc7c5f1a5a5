//! Metering throughput: an OpenAI chat completion stream of typical
//! chunks fed in the sizes a proxy sees, and a large embeddings body whose
//! floats are skipped. Run with `cargo bench --bench meter`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde::Deserialize;
use tollgate::server::meter::{Api, Meter};

const WORDS: [&str; 12] = [
    " the", " quick", " brown", " fox", " jumps", " over", " lazy", " dogs,", " and", " then",
    " naps", ".\n",
];

/// `events` chunks of a chat completion stream (each about 280 bytes,
/// with one or two words of content), the usage chunk and `[DONE]`.
fn chat_stream(events: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..events {
        let content = if i % 3 == 0 {
            format!("{}{}", WORDS[i % WORDS.len()], WORDS[(i + 5) % WORDS.len()])
        } else {
            WORDS[i % WORDS.len()].to_string()
        };
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-AZ9fBx2LkQeTQvYhIPmGz1p0wRkx\",\"object\":\"chat.completion.chunk\",\"created\":1730000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n",
            serde_json::to_string(&content).unwrap()
        ));
    }
    out.push_str("data: {\"id\":\"chatcmpl-AZ9fBx2LkQeTQvYhIPmGz1p0wRkx\",\"object\":\"chat.completion.chunk\",\"created\":1730000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":4000,\"total_tokens\":5200,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}\n\ndata: [DONE]\n\n");
    out.into_bytes()
}

/// An embeddings response: `n` vectors of 1536 floats.
fn embeddings(n: usize) -> Vec<u8> {
    let mut out = String::from("{\"object\":\"list\",\"data\":[");
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        let floats: Vec<String> = (0..1536)
            .map(|j| format!("{:.10}", ((i * 1536 + j) as f64 * 0.37).sin() / 9.0))
            .collect();
        out.push_str(&format!(
            "{{\"object\":\"embedding\",\"index\":{i},\"embedding\":[{}]}}",
            floats.join(",")
        ));
    }
    out.push_str("],\"model\":\"text-embedding-3-small\",\"usage\":{\"prompt_tokens\":80,\"total_tokens\":80}}");
    out.into_bytes()
}

fn meter(api: Api, sse: bool, body: &[u8], chunk: usize) -> u64 {
    let mut m = Meter::new(api, sse);
    for c in body.chunks(chunk) {
        m.feed(black_box(c));
    }
    let metered = m.finish();
    metered.reported.map_or(0, |r| r.output_tokens) + metered.counted_output_tokens
}

/// The alternative measured against: each event's data parsed with
/// `serde_json` into a small typed struct, from data already split out
/// (so without the cost of framing).
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    model: Option<&'a str>,
    #[serde(default)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: u64,
}

fn bench(c: &mut Criterion) {
    let stream = chat_stream(4000);
    let events = stream
        .split(|&b| b == b'\n')
        .filter(|l| l.len() > 6)
        .count();
    assert!(
        (200..=300).contains(&(stream.len() / events)),
        "{} bytes an event",
        stream.len() / events
    );
    assert!(meter(Api::OpenAiChat, true, &stream, 4096) > 4000);

    let mut group = c.benchmark_group("meter/openai-chat-sse");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    // One event a chunk (a provider flushing each), a TCP segment, and
    // Envoy's 16 KiB reads.
    for chunk in [256usize, 1460, 16 << 10] {
        group.bench_with_input(BenchmarkId::new("chunk", chunk), &chunk, |b, &chunk| {
            b.iter(|| meter(Api::OpenAiChat, true, &stream, chunk))
        });
    }
    group.finish();

    let data: Vec<&[u8]> = stream
        .split(|&b| b == b'\n')
        .filter_map(|l| l.strip_prefix(b"data: "))
        .filter(|d| d.first() == Some(&b'{'))
        .collect();
    let mut group = c.benchmark_group("reference/serde-json-typed-events");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("pre-split", |b| {
        b.iter(|| {
            let mut chars = 0usize;
            let mut out = 0;
            for d in &data {
                let Ok(chunk) = serde_json::from_slice::<Chunk>(black_box(d)) else {
                    continue;
                };
                black_box(chunk.model);
                for choice in chunk.choices {
                    if let Some(text) = choice.delta.and_then(|d| d.content) {
                        chars += text.chars().count();
                    }
                }
                if let Some(u) = chunk.usage {
                    out = u.completion_tokens;
                }
            }
            (chars, out)
        })
    });
    group.finish();

    let body = embeddings(16);
    let mut group = c.benchmark_group("meter/openai-embeddings-json");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("chunk/16384", |b| {
        b.iter(|| meter(Api::OpenAiEmbeddings, false, &body, 16 << 10))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
