//! `tollgate health`: one GET of a running server's `/readyz`, so that a
//! container image without curl can still have a health check.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use axum::http::Method;
use hyper::body::Bytes;
use tollgate::http_client;

use super::client::{Server, ServerTlsArgs};
use super::runtime::{runtime, Threads};
use super::serve_command;

/// A health check that takes longer than this fails.
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(clap::Args)]
pub(super) struct HealthArgs {
    /// The server's HTTP listener; an unspecified address (0.0.0.0) means
    /// this host. Without it, `http-listen` from the `serve` configuration
    /// file, then 127.0.0.1:8080.
    #[arg(long, env = "TOLLGATE_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// The server's HTTP listener as a URL, in place of `--http-listen`:
    /// http://HOST:PORT, or https://HOST:PORT for a server with TLS.
    #[arg(long)]
    server: Option<String>,
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// The `serve` configuration file, read for `http-listen` only.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// `/readyz` (ready for traffic) or `/healthz` (process up).
    #[arg(long, default_value = "/readyz")]
    path: String,
}

pub(super) fn health(args: &HealthArgs) -> ExitCode {
    let url = match &args.server {
        Some(url) => url.clone(),
        None => match listen_address(args) {
            Ok(addr) => return check(&format!("http://{}", this_host(addr)), &addr, args),
            Err(code) => return code,
        },
    };
    check(&url, &url, args)
}

/// Asks `url` for `--path`; prints the answer, and exits 0 if it was 200.
/// Errors are prefixed with `shown`, the address as it was given.
fn check(url: &str, shown: &dyn std::fmt::Display, args: &HealthArgs) -> ExitCode {
    let runtime = match runtime(Threads::One) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let answer = Server::new(url, &args.tls).and_then(|server| {
        runtime.block_on(http_client::send_with(
            &server.target,
            server.tls,
            Method::GET,
            &args.path,
            &[],
            Bytes::new(),
            TIMEOUT,
        ))
    });
    match answer {
        Ok(answer) => {
            println!("{}", String::from_utf8_lossy(&answer.body).trim());
            if answer.status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{shown}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--http-listen`, else `http-listen` from the configuration file, else
/// 127.0.0.1:8080.
fn listen_address(args: &HealthArgs) -> Result<SocketAddr, ExitCode> {
    let default = SocketAddr::from(([127, 0, 0, 1], 8080));
    match (args.http_listen, &args.config) {
        (Some(addr), _) => Ok(addr),
        (None, None) => Ok(default),
        (None, Some(path)) => Ok(from_config_file(path)?.unwrap_or(default)),
    }
}

/// `http-listen` from the `serve` configuration file at `path`.
fn from_config_file(path: &Path) -> Result<Option<SocketAddr>, ExitCode> {
    let file = match tollgate::config::FileConfig::load(path, &serve_command()) {
        Ok(file) => file,
        Err(errors) => {
            for e in errors {
                eprintln!("error: {e}");
            }
            return Err(ExitCode::FAILURE);
        }
    };
    match file.values_of("http_listen").and_then(|v| v.first()) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|e| {
            eprintln!("{}: http-listen: {e}", path.display());
            ExitCode::FAILURE
        }),
    }
}

/// An unspecified address (0.0.0.0, ::) as this host's loopback.
fn this_host(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}
