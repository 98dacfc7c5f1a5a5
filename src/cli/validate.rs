//! `tollgate validate`: every error in a set of policy directories.

use std::path::PathBuf;
use std::process::ExitCode;

use tollgate_core::policy;

pub(super) fn validate(dirs: &[PathBuf]) -> ExitCode {
    match policy::load_dirs(dirs) {
        Ok(p) => {
            for (origin, message) in &p.set.warnings {
                eprintln!("warning: {origin}: {message}");
            }
            println!(
                "ok: {} rules, policy version {}",
                p.rules().len(),
                p.version
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
            ExitCode::FAILURE
        }
    }
}
