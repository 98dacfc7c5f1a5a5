//! `tollgate serve`: the checks that come before a runtime (logging, TLS
//! certificates, the policies), then [`App::build`] and [`App::run`].

mod app;
mod args;
mod run;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tollgate::reload;
use tollgate::server::tls::{self, TlsFiles};
use tollgate_core::policy::CompiledPolicy;

use super::runtime::{runtime, Threads};
use app::App;
pub(crate) use args::{LogFormat, ServeArgs};

/// The certificate files, the pair they hold (reloaded when they change)
/// and the server configurations that present it, one per listener (they
/// differ in ALPN).
pub(crate) struct ListenerTls {
    files: TlsFiles,
    cert: Arc<tls::ServerCert>,
    grpc: Arc<rustls::ServerConfig>,
    http: Arc<rustls::ServerConfig>,
}

pub(crate) fn serve(args: ServeArgs) -> ExitCode {
    if let Err(e) = init_logging(args.log_format, &args.log_level) {
        eprintln!("error: --log-level: {e}");
        return ExitCode::from(2);
    }
    let tls = match listener_tls(&args) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(policy) = load_policies(&args) else {
        return ExitCode::FAILURE;
    };
    let runtime = match runtime(Threads::PerCore) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let code = runtime.block_on(async move {
        match App::build(args, policy, tls).await {
            Ok(app) => app.run().await,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        }
    });
    // Blocking reload threads are not waited for past this.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Both listeners' TLS is checked before anything starts, so a bad
/// certificate is a refusal to start rather than a half-up server.
fn listener_tls(args: &ServeArgs) -> Result<Option<ListenerTls>, tls::TlsError> {
    let Some((cert, key)) = args.tls_cert.clone().zip(args.tls_key.clone()) else {
        return Ok(None);
    };
    let files = TlsFiles {
        cert,
        key,
        client_ca: args.tls_client_ca.clone(),
    };
    let cert = tls::ServerCert::load(&files)?;
    let grpc = tls::server_config(&files, &cert, tls::ALPN_H2);
    let http = tls::server_config(&files, &cert, tls::ALPN_HTTP1);
    Ok(Some(ListenerTls {
        grpc: grpc?,
        http: http?,
        files,
        cert,
    }))
}

/// The policies, or `None` after printing every error in them.
fn load_policies(args: &ServeArgs) -> Option<CompiledPolicy> {
    match reload::load(&args.policies, args.allow_empty) {
        Ok(policy) => {
            tracing::info!(rules = policy.rules().len(), version = %policy.version, "policies loaded");
            Some(policy)
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "refusing to start: {} error(s) in the policies",
                errors.0.len()
            );
            None
        }
    }
}

/// Logs go to stderr, as text or one JSON object a line.
fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    // Colour codes only help a person at a terminal; in a file or a log
    // collector they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
