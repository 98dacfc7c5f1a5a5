//! `serve --config FILE` under the command line and environment, and
//! `serve --print-config`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;

use super::{serve_command, Cli};

/// Layers `serve --config FILE` under the command line and environment:
/// the file's settings become flags for whatever the first parse left at
/// its default, and the whole command line is parsed again.
pub(super) fn with_config_file(
    mut argv: Vec<OsString>,
    matches: clap::ArgMatches,
) -> Result<(clap::ArgMatches, BTreeSet<String>), ExitCode> {
    let Some(serve) = matches.subcommand_matches("serve") else {
        return Ok((matches, Default::default()));
    };
    let Some(path) = serve.get_one::<PathBuf>("config") else {
        return Ok((matches, Default::default()));
    };
    let file = match tollgate::config::FileConfig::load(path, &serve_command()) {
        Ok(f) => f,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s) in the configuration file", errors.len());
            return Err(ExitCode::from(2));
        }
    };
    let (extra, applied) = file.extra_args(serve);
    argv.extend(extra);
    match Cli::command().try_get_matches_from(&argv) {
        Ok(m) => Ok((m, applied)),
        Err(e) => {
            let _ = e.print();
            eprintln!("(after applying {})", file.path().display());
            Err(ExitCode::from(2))
        }
    }
}

/// `serve --print-config`: the effective configuration, credentials
/// redacted.
pub(super) fn print_config(
    config: Option<&Path>,
    serve: &clap::ArgMatches,
    from_file: &BTreeSet<String>,
) -> ExitCode {
    if let Some(path) = config {
        println!("# Configuration file: {}", path.display());
    }
    print!(
        "{}",
        tollgate::config::render(&serve_command(), serve, from_file)
    );
    ExitCode::SUCCESS
}
