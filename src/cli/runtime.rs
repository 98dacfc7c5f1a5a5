//! The tokio runtimes the commands run on.

use std::process::ExitCode;

/// How many worker threads a runtime has.
#[derive(Clone, Copy)]
pub(crate) enum Threads {
    /// One thread: for one-off client commands.
    One,
    /// One per core: for `serve`.
    PerCore,
}

/// A runtime with I/O and timers enabled; when it cannot be made, the
/// reason is printed and the failure code returned.
pub(crate) fn runtime(threads: Threads) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build().map_err(|e| {
        eprintln!("cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}
