//! The settle form (`server::settle`), as `POST /v1/settle` reads it
//! (JSON) and as the native API builds it (a protobuf `SettleRequest`),
//! then settled for real: a fresh gate allows one request and the
//! fuzzed usage settles its reservation.
//!
//! Checks: nothing panics; an accepted form has a reservation id,
//! non-negative amounts and no more reasoning than output; its usage
//! never prices below zero or past the counter bound; the settle of a
//! live reservation settles (a usage that cannot be priced keeps the
//! estimate), a repeat is already settled, and the counters it leaves
//! are never negative.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tollgate::proto::v1 as pb;
use tollgate::server::settle::SettleForm;
use tollgate_core::engine::{Attributes, Estimate, Verdict};
use tollgate_core::gate::{CheckInput, GateError};
use tollgate_core::policy::Attr;
use tollgate_core::store::SettleOutcome;

/// The native API's form, as `native.rs` makes it.
fn native(bytes: &[u8]) -> Option<SettleForm> {
    let req = pb::SettleRequest::decode(bytes).ok()?;
    Some(tollgate::server::native::settle_form(req))
}

const MODELS: [(&str, &str); 6] = [
    ("gpt-4o", "text"),
    ("o3", "text"),
    ("gpt-image-1", "image"),
    ("sora-2", "video"),
    ("whisper-1", "audio"),
    ("text-embedding-3-small", "embedding"),
];

fn input(model: &str, modality: &str) -> CheckInput {
    let mut attributes = Attributes::default();
    for (attr, value) in [
        (Attr::Team, "growth"),
        (Attr::Environment, "staging"),
        (Attr::Customer, "c-1"),
        (Attr::Label("plan".to_string()), "free"),
        (Attr::Model, model),
        (Attr::Modality, modality),
    ] {
        attributes.set(&attr, value.to_string());
    }
    CheckInput {
        attributes,
        // No key: the shipped registry denies a key it does not know.
        api_key: None,
        estimate: Estimate::default(),
        ..Default::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let form = if flags & 1 == 0 {
        match serde_json::from_slice::<SettleForm>(rest) {
            Ok(f) => f,
            Err(_) => return,
        }
    } else {
        match native(rest) {
            Some(f) => f,
            None => return,
        }
    };
    let Ok((id, actual)) = form.checked() else {
        return;
    };
    assert!(!id.trim().is_empty(), "an accepted settle without an id");
    assert!(!actual.video_seconds.is_sign_negative(), "{actual:?}");
    assert!(!actual.audio_seconds.is_sign_negative(), "{actual:?}");
    assert!(actual.image_quality.as_deref() != Some(""), "{actual:?}");
    assert!(
        actual.reasoning_tokens <= actual.output_tokens,
        "{actual:?}"
    );

    let policy = tollgate_fuzz::policy(false);
    tollgate_fuzz::check_charges(&actual.usage(&policy.set.defaults.image_quality));

    let (model, modality) = MODELS[usize::from(flags >> 1) % MODELS.len()];
    let gate = tollgate_fuzz::gate(tollgate_fuzz::fresh_policy(false));
    tollgate_fuzz::block_on(async {
        let decision = gate.check(input(model, modality)).await.unwrap();
        assert_ne!(decision.verdict, Verdict::Deny, "{decision:?}");
        let reservation = decision.reservation_id.expect("a reservation");
        match gate.settle(&reservation, &actual).await {
            Ok(SettleOutcome::Settled) => {}
            other => panic!("settling a live reservation: {other:?}"),
        }
        // The same id again is a repeat, never a second charge.
        match gate.settle(&reservation, &actual).await {
            Ok(SettleOutcome::AlreadySettled) => {}
            other => panic!("settling twice: {other:?}"),
        }
        let after = gate.check(input(model, modality)).await.unwrap();
        for c in &after.counters {
            assert!(!c.used.is_sign_negative(), "{c:?} after {actual:?}");
        }
        // The unknown id of the fuzzed form is unknown, whatever it is.
        if id != reservation {
            let got = gate.settle(&id, &actual).await;
            assert!(
                matches!(
                    got,
                    Ok(SettleOutcome::Unknown) | Err(GateError::UnknownReservation(_))
                ),
                "settling an unknown id: {got:?}"
            );
        }
    });
});
