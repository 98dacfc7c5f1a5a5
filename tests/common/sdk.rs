//! The official OpenAI and Anthropic Python SDKs, from the virtual
//! environment scripts/test-deps makes. A test that needs them fails,
//! never skips, when they are missing.

use std::path::PathBuf;
use std::process::Command;

/// Environment that could point an SDK at anything but the test's server.
const FOREIGN: [&str; 13] = [
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// The venv's interpreter, with nothing from this machine's environment
/// able to send the SDKs elsewhere than loopback.
pub fn python() -> Command {
    let python = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/sdk-venv/bin/python"
    ));
    assert!(
        python.exists(),
        "{} is missing: run scripts/test-deps",
        python.display()
    );
    let mut cmd = Command::new(python);
    for var in FOREIGN {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    cmd
}
