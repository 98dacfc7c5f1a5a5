//! Webhook delivery: one signed HTTP POST of an alert.

use std::time::Duration;

use axum::http::Method;
use hmac::{Hmac, Mac};
use hyper::body::Bytes;
use sha2::Sha256;

use crate::http_client::{self, Target};

/// The header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-tollgate-signature";

/// The signature of `body` under `secret`, as sent in [`SIGNATURE_HEADER`].
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret) {
        Ok(mac) => mac,
        // HMAC takes keys of any length; this arm is never reached.
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!(
        "sha256={}",
        tollgate_core::policy::hex(&mac.finalize().into_bytes())
    )
}

/// Posts `body` to `url` and returns the response status.
pub async fn post(
    url: &str,
    body: Bytes,
    headers: &[(&str, String)],
    timeout: Duration,
) -> Result<u16, String> {
    let target = Target::parse(url)?;
    let mut all = vec![("content-type", "application/json".to_string())];
    all.extend(headers.iter().cloned());
    http_client::send(&target, Method::POST, "", &all, body, timeout)
        .await
        .map(|a| a.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_rfc_4231_test_case_2() {
        // RFC 4231, test case 2: key "Jefe".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
