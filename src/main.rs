//! The `tollgate` command: serve, validate, explain, health, usage, and
//! the approval commands (see [`cli`]).

#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

/// glibc's allocator showed up as a fifth of the CPU time of a decision
/// under load; mimalloc's thread-local caches suit tokio's small, short-lived
/// allocations much better.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match cli::parse(std::env::args_os().collect()) {
        Ok(parsed) => cli::dispatch(parsed),
        Err(code) => code,
    }
}
