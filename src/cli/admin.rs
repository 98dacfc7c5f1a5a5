//! `tollgate approve`, `revoke` and `approvals`: the admin API of a
//! running server, over its HTTP port or its own admin listener.

use std::path::PathBuf;
use std::process::ExitCode;

use tollgate::admin_client::{describe_grant, AdminCallError, AdminClient};

use super::client::client_tls;
use super::runtime::{runtime, Threads};

#[derive(clap::Args)]
pub(super) struct AdminClientArgs {
    /// The server's HTTP port or admin listener: http://HOST:PORT or
    /// unix:/path/to.sock.
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// File holding the admin token; or set TOLLGATE_ADMIN_TOKEN.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// For https://: the CA (PEM) that signed the server's certificate, in
    /// place of the public web roots.
    #[arg(long, env = "TOLLGATE_ADMIN_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// For https://: a client certificate (PEM) to present, for an admin
    /// listener that requires one.
    #[arg(long, env = "TOLLGATE_ADMIN_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of `--client-cert`.
    #[arg(long, env = "TOLLGATE_ADMIN_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(super) struct ApproveArgs {
    #[command(flatten)]
    client: AdminClientArgs,
    /// The rule to approve (`enforcement: approval` or `on_exceed: approval`).
    #[arg(long)]
    rule: String,
    /// The scope, as the rule counts it: team=growth (comma-separated for
    /// several attributes), or all.
    #[arg(long, default_value = "all")]
    scope: String,
    /// Added to the rule's limit while the approval lasts, in its unit
    /// (USD for spend).
    #[arg(long)]
    extra: Option<String>,
    /// How long the approval lasts: 12h, 7d (at most 366d).
    #[arg(long = "for", default_value = "1d")]
    duration: String,
    /// Why; recorded in the audit trail.
    #[arg(long)]
    reason: String,
    /// Who approves; recorded in the audit trail. Defaults to $USER.
    #[arg(long)]
    approver: Option<String>,
}

#[derive(clap::Args)]
pub(super) struct RevokeArgs {
    #[command(flatten)]
    client: AdminClientArgs,
    #[arg(long)]
    rule: String,
    #[arg(long, default_value = "all")]
    scope: String,
    /// Why; recorded in the audit trail.
    #[arg(long, default_value = "")]
    reason: String,
    /// Who revokes. Defaults to $USER.
    #[arg(long)]
    by: Option<String>,
}

#[derive(clap::Args)]
pub(super) struct ApprovalsArgs {
    #[command(flatten)]
    client: AdminClientArgs,
    /// Also print this many of the newest audit entries.
    #[arg(long, default_value_t = 0)]
    audit: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The admin token from a file or TOLLGATE_ADMIN_TOKEN; `None` when
/// neither is set.
pub(super) fn admin_token(file: Option<&PathBuf>) -> Result<Option<String>, String> {
    if let Some(path) = file {
        return std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()));
    }
    Ok(std::env::var("TOLLGATE_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

/// A client for the server the flags name, with its token and TLS setup;
/// a usage error (exit 2) when they are missing or bad.
fn admin_client(args: &AdminClientArgs) -> Result<AdminClient, ExitCode> {
    let usage_error = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    let token = match admin_token(args.token_file.as_ref()) {
        Ok(Some(t)) => t,
        Ok(None) => {
            return Err(usage_error(
                "give the admin token with --token-file or TOLLGATE_ADMIN_TOKEN".to_string(),
            ))
        }
        Err(e) => return Err(usage_error(e)),
    };
    let tls = client_tls(
        args.ca_file.as_deref(),
        args.client_cert.as_deref(),
        args.client_key.as_deref(),
    );
    match (AdminClient::new(&args.server, &token), tls) {
        (Ok(c), Ok(None)) => Ok(c),
        (Ok(c), Ok(Some(tls))) => Ok(c.with_tls(tls)),
        (Err(e), _) | (_, Err(e)) => Err(usage_error(e)),
    }
}

/// Runs `call` with a client for the server the flags name and prints
/// what it returns.
fn admin_call<F>(args: &AdminClientArgs, call: impl FnOnce(AdminClient) -> F) -> ExitCode
where
    F: std::future::Future<Output = Result<String, AdminCallError>>,
{
    let client = match admin_client(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match runtime(Threads::One) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(call(client)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default()
}

/// Who approves or revokes: the flag, else $USER; audits need a name.
fn actor(given: Option<&str>, flag: &str) -> Result<String, ExitCode> {
    let name = given.map(str::to_string).unwrap_or_else(current_user);
    if name.trim().is_empty() {
        eprintln!("error: give {flag} NAME: there is no $USER to record as who did it");
        return Err(ExitCode::from(2));
    }
    Ok(name)
}

pub(super) fn approve(args: ApproveArgs) -> ExitCode {
    let approver = match actor(args.approver.as_deref(), "--approver") {
        Ok(name) => name,
        Err(code) => return code,
    };
    let body = serde_json::json!({
        "rule": args.rule,
        "scope": args.scope,
        "extra": args.extra,
        "for": args.duration,
        "approver": approver,
        "reason": args.reason,
    });
    admin_call(&args.client, |c| async move {
        let grant = c.approve(&body).await?;
        Ok(format!("approved: {}\n", describe_grant(&grant)))
    })
}

pub(super) fn revoke(args: RevokeArgs) -> ExitCode {
    let by = match actor(args.by.as_deref(), "--by") {
        Ok(name) => name,
        Err(code) => return code,
    };
    let body = serde_json::json!({
        "rule": args.rule,
        "scope": args.scope,
        "revoked_by": by,
        "reason": args.reason,
    });
    admin_call(&args.client, |c| async move {
        let grant = c.revoke(&body).await?;
        Ok(format!("revoked: {}\n", describe_grant(&grant)))
    })
}

pub(super) fn approvals(args: ApprovalsArgs) -> ExitCode {
    let (audit, json) = (args.audit, args.json);
    admin_call(&args.client, |c| async move {
        let listing = c.list(audit).await?;
        if json {
            return Ok(format!("{listing:#}\n"));
        }
        Ok(approvals_text(&listing, audit))
    })
}

/// Active grants, then the audit trail when `audit` entries were asked for.
fn approvals_text(listing: &serde_json::Value, audit: usize) -> String {
    let mut out = String::new();
    let grants = listing["grants"].as_array().cloned().unwrap_or_default();
    if grants.is_empty() {
        out.push_str("no active approvals\n");
    }
    for g in &grants {
        out.push_str(&describe_grant(g));
        out.push('\n');
    }
    if audit > 0 {
        out.push_str("\naudit trail (oldest first):\n");
        for entry in listing["audit"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!(
                "{}  {}  by {}: {}  [{}]\n",
                entry["at"].as_str().unwrap_or(""),
                entry["action"].as_str().unwrap_or(""),
                entry["by"].as_str().unwrap_or(""),
                entry["reason"].as_str().unwrap_or(""),
                describe_grant(&entry["grant"])
            ));
        }
    }
    out
}
