//! The HTTP request mapper (`server::http_request::check_input`), on a
//! request in the text form of `tollgate_fuzz::TextRequest`, under the
//! shipped policies with and without an `attributes:` section.
//!
//! Checks: nothing panics; the same request maps the same way twice; a
//! header the mapper always reads that is not UTF-8 is an error, never
//! skipped; what a whole body shows is the estimate, and its model wins
//! over headers; the key and replay key come only from where they may.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::server::body;
use tollgate::server::http_request::check_input;
use tollgate_fuzz::TextRequest;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let req = TextRequest::parse(rest);
    let policy = tollgate_fuzz::policy(flags & 1 == 1);
    let mapping = &policy.set.attributes;
    let view = req.view();
    let got = check_input(mapping, &view);
    let again = check_input(mapping, &view);
    assert_eq!(
        format!("{got:?}"),
        format!("{again:?}"),
        "not deterministic"
    );

    for name in ["authorization", "x-envoy-auth-partial-body"] {
        if req
            .header(name)
            .is_some_and(|v| std::str::from_utf8(v).is_err())
        {
            assert!(got.is_err(), "`{name}` is not UTF-8 but was read: {got:?}");
        }
    }
    let Ok(input) = got else {
        return;
    };

    if let Some(key) = &input.api_key {
        assert!(!key.is_empty(), "an empty key");
        assert_eq!(key.trim(), key, "a key with spaces around it");
    }
    match &mapping.request_id_header {
        None => assert_eq!(
            input.request_id.as_deref(),
            req.proxy_request_id.as_deref().filter(|id| !id.is_empty()),
            "a replay key not from the proxy"
        ),
        Some(h) => {
            if req.header(h).is_none() {
                assert_eq!(input.request_id, None, "a replay key without its header");
            }
        }
    }
    assert_eq!(
        input.can_switch_model,
        req.context.get("downgrade").map(String::as_str) == Some("header")
    );

    let body = req.body.as_deref().filter(|b| !b.is_empty());
    let partial = req
        .header("x-envoy-auth-partial-body")
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
        == Some("true");
    if let (Some(body), false) = (body, partial) {
        let facts = body::read(body);
        assert_eq!(
            input.estimate, facts.estimate,
            "the body's estimate was not used"
        );
        let routed = req.context.contains_key("model")
            || mapping
                .trusted_headers
                .iter()
                .any(|(a, h)| a.name() == "model" && req.header(h).is_some());
        if let (Some(model), false) = (&facts.model, routed) {
            assert_eq!(
                input.attributes.model.as_ref(),
                Some(model),
                "the body's model lost to a header"
            );
        }
    }

    let _ = input.attributes.validate();
    let _ = input.client_attributes.validate();
    let _ = input.estimate.validate();
});
