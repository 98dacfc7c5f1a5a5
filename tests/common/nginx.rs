//! nginx (Debian's package) with the shipped config, and upstream stubs to
//! put behind it or behind any other front end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::free_port;

/// What an upstream stub answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answers {
    /// `{"ok":true}` to everything.
    Ok,
    /// What the real APIs answer, so that their SDKs parse a success: an
    /// OpenAI ChatCompletion on `/v1/chat/completions`, an Anthropic Message
    /// on `/v1/messages`, and `{"ok":true}` elsewhere.
    Api,
}

/// The hit counter and every request head that reached a stub.
pub type Stub = (u16, Arc<AtomicU64>, Arc<Mutex<Vec<String>>>);

/// An upstream that answers 200 and remembers what reached it.
pub async fn upstream_stub() -> Stub {
    stub(Answers::Ok).await
}

/// [`upstream_stub`] answering like the OpenAI and Anthropic APIs: the
/// SDKs see a success they can parse, with the text `hi`.
pub async fn api_upstream_stub() -> Stub {
    stub(Answers::Api).await
}

/// A minimal valid OpenAI ChatCompletion.
pub const CHAT_COMPLETION: &str = r#"{"id":"chatcmpl-stub","object":"chat.completion","created":1700000000,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"hi","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

/// A minimal valid Anthropic Message.
pub const MESSAGE: &str = r#"{"id":"msg_stub","type":"message","role":"assistant","content":[{"type":"text","text":"hi"}],"model":"claude-sonnet-4","stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}"#;

async fn stub(answers: Answers) -> Stub {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (h, s) = (hits.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let (h, s) = (h.clone(), s.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = Vec::new();
                let head_end = loop {
                    if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&got[..head_end]).to_string();
                // Read the whole body before answering: closing with unread
                // bytes would reset the connection under the reply.
                let length = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                while got.len() < head_end + length {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&got).to_string());
                let path = head.split(' ').nth(1).unwrap_or("").split('?').next();
                let body = match (answers, path) {
                    (Answers::Api, Some("/v1/chat/completions")) => CHAT_COMPLETION,
                    (Answers::Api, Some("/v1/messages")) => MESSAGE,
                    _ => "{\"ok\":true}",
                };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    (port, hits, seen)
}

pub struct Nginx {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM lets the master stop its workers; KILL would orphan them.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts nginx with the shipped config, its ports rewritten.
pub fn nginx(upstream: u16, tollgate_http: u16) -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/nginx/nginx.conf"
    ))
    .unwrap();
    assert!(
        shipped.contains("127.0.0.1:9000")
            && shipped.contains("127.0.0.1:8080")
            && shipped.contains("127.0.0.1:8000")
    );
    let conf = shipped
        .replace("127.0.0.1:9000", &format!("127.0.0.1:{upstream}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{tollgate_http}"))
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{port}"))
        .replace(
            "/tmp/tollgate-nginx.pid",
            &dir.path().join("nginx.pid").display().to_string(),
        );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let binary = ["/usr/sbin/nginx", "nginx"]
        .into_iter()
        .find(|b| std::path::Path::new(b).exists())
        .unwrap_or("nginx");
    let child = std::process::Command::new(binary)
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(dir.path())
        .args(["-g", "daemon off;"])
        .spawn()
        .unwrap_or_else(|e| panic!("nginx must be installed for this test: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx {
        child,
        port,
        _dir: dir,
    }
}
