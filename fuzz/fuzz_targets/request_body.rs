//! The request body readers (`server::body`): a whole body (`read`), a
//! body the proxy may have cut (`read_prefix`) and a Gemini path
//! (`model_from_path`), then the estimate priced in every unit.
//!
//! Checks: nothing panics; `read_prefix` sizes the input from the
//! declared length as documented; on a whole JSON object it reads what
//! `read` reads; a prompt kept for an exact count approximates as the
//! estimate and counts in both encodings; a charge is never negative.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::server::body::{model_from_path, read, read_prefix, BodyFacts};
use tollgate_core::engine::charge::{Basis, Usage};
use tollgate_core::policy::Tokenizer;

fn input_tokens(bytes: u64) -> Option<u64> {
    (bytes > 0).then(|| bytes.div_ceil(4))
}

fn priced(facts: &BodyFacts) {
    let policy = tollgate_fuzz::policy(false);
    let model = facts.model.as_deref();
    let price = model.and_then(|m| policy.price(m));
    for modality in [
        None,
        Some("text"),
        Some("image"),
        Some("video"),
        Some("audio"),
    ] {
        let usage = Usage::from_estimate(
            &facts.estimate,
            &Basis {
                model,
                modality,
                price,
                defaults: &policy.set.defaults,
                learned_output: None,
            },
        );
        tollgate_fuzz::check_charges(&usage);
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = read(data);
    let len = data.len() as u64;
    for declared in [None, Some(0), Some(len), Some(len * 3 + 7), Some(u64::MAX)] {
        let f = read_prefix(data, declared);
        let want = input_tokens(declared.unwrap_or(0).max(len));
        assert_eq!(f.estimate.input_tokens, want, "declared {declared:?}");
    }

    // A whole object reads the same either way, but for the input, which
    // `read_prefix` sizes by bytes rather than by prompt text, and keeps no
    // prompt for an exact count.
    let is_object = serde_json::from_slice::<serde_json::Value>(data).is_ok_and(|v| v.is_object());
    if is_object {
        let mut f = read_prefix(data, None);
        f.estimate.input_tokens = whole.estimate.input_tokens;
        f.estimate.prompt = whole.estimate.prompt.clone();
        assert_eq!(f, whole, "read_prefix and read disagree on a whole body");
    } else {
        assert_eq!(
            whole,
            BodyFacts::default(),
            "facts from a body that is no object"
        );
    }

    // A kept prompt approximates as the estimate does, and counts exactly
    // in both encodings without panicking, whatever its text.
    if let Some(p) = &whole.estimate.prompt {
        assert_eq!(Some(p.approximate()), whole.estimate.input_tokens);
        assert!(p.bytes() <= tollgate_core::engine::tokens::EXACT_MAX_BYTES);
        for t in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
            let _ = p.count(t);
        }
    }

    priced(&whole);
    priced(&read_prefix(data, Some(len)));

    if let Ok(path) = std::str::from_utf8(data) {
        if let Some(m) = model_from_path(path) {
            assert!(
                !m.is_empty() && !m.contains('/'),
                "model {m:?} from {path:?}"
            );
        }
    }
});
