//! The response meter (`server::meter`), JSON bodies and SSE streams of
//! every API, fed in chunk splits drawn from the input; and the SSE
//! splitter that ext_proc rewrites streams with.
//!
//! Input: one byte picks the API and whether the body is an event
//! stream, one seeds the split points, the rest is the body.
//!
//! Checks: nothing panics; the result is the same whole, in random
//! chunks and byte by byte; the meter never holds more than `MAX_HELD`
//! bytes and counts every byte; a report never has more cached input
//! than input; the splitter's pieces and what it holds at the end are
//! the stream byte for byte, and it never holds more than its bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::server::meter::sse::{Piece, Splitter};
use tollgate::server::meter::{Api, Meter, Metered, MAX_HELD};
use tollgate_fuzz::XorShift;

const APIS: [Api; 7] = [
    Api::OpenAiChat,
    Api::OpenAiCompletions,
    Api::OpenAiResponses,
    Api::OpenAiEmbeddings,
    Api::OpenAiImages,
    Api::Anthropic,
    Api::Gemini,
];

fn run<'a>(api: Api, sse: bool, chunks: impl Iterator<Item = &'a [u8]>) -> Metered {
    let mut m = Meter::new(api, sse);
    for c in chunks {
        m.feed(c);
        assert!(m.held_bytes() <= MAX_HELD, "holds {} bytes", m.held_bytes());
        let _ = m.counted_output_tokens();
    }
    m.finish()
}

/// `body` cut at a few random points.
fn random_chunks<'a>(body: &'a [u8], rng: &mut XorShift) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len().min(64));
        let (a, b) = rest.split_at(n);
        chunks.push(a);
        rest = b;
    }
    chunks
}

fuzz_target!(|data: &[u8]| {
    let [kind, seed, body @ ..] = data else {
        return;
    };
    let api = APIS[usize::from(kind & 0x7f) % APIS.len()];
    let sse = kind & 0x80 != 0;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ u64::from(*seed) << 32 | body.len() as u64);

    let whole = run(api, sse, std::iter::once(body));
    assert_eq!(whole.bytes, body.len() as u64);
    if let Some(r) = &whole.reported {
        assert!(r.cached_input_tokens <= r.input_tokens, "{r:?}");
    }
    let chunks = random_chunks(body, &mut rng);
    assert_eq!(
        run(api, sse, chunks.iter().copied()),
        whole,
        "random chunks"
    );
    assert_eq!(run(api, sse, body.chunks(1)), whole, "1-byte chunks");

    let max = 1 + rng.below(256);
    let mut splitter = Splitter::new(max);
    let mut out = Vec::with_capacity(body.len());
    for chunk in random_chunks(body, &mut rng) {
        splitter.push(chunk, |piece| match piece {
            Piece::Event(e) => {
                assert!(e.len() <= max, "an event of {} bytes over {max}", e.len());
                out.extend_from_slice(e)
            }
            Piece::Overflow(o) => out.extend_from_slice(o),
        });
        assert!(
            splitter.held_bytes() <= max,
            "holds {} of {max}",
            splitter.held_bytes()
        );
    }
    out.extend_from_slice(&splitter.finish());
    assert_eq!(out, body, "the splitter changed the stream");
});
