//! The command line: the clap types, the `serve --config` layering, and
//! one module per command.

mod admin;
mod args;
mod client;
mod config_file;
mod explain;
mod health;
mod pricing;
mod runtime;
mod serve;
mod spend;
mod usage;
mod validate;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Keeps AI API spend inside approved budgets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: gRPC (native API, Envoy ext_authz, health) and HTTP.
    Serve(Box<serve::ServeArgs>),
    /// Check policy directories; print every error with file:line:column.
    Validate {
        /// Policy directories, read together as one set.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Show which rules a request meets and the decision on an empty store.
    Explain(explain::ExplainArgs),
    /// Ask a running server's HTTP port whether it is ready; exit 0 if so.
    /// For container health checks.
    Health(health::HealthArgs),
    /// Approve a rule for a scope on a running server (needs the admin token).
    Approve(admin::ApproveArgs),
    /// End an approval before its time.
    Revoke(admin::RevokeArgs),
    /// List active approvals and the newest audit entries.
    Approvals(admin::ApprovalsArgs),
    /// Show counters against their limits, from a running server or from
    /// Redis directly.
    Usage(usage::UsageArgs),
    /// Show what was spent, by model, team, key, workflow, environment,
    /// customer or modality, from a running server or from Redis directly.
    Spend(spend::SpendArgs),
    /// Show the price charged for a model and where it comes from, or the
    /// models a running server saw without a price.
    #[command(subcommand)]
    Pricing(pricing::PricingCommand),
}

/// A parsed command line, with what `serve --config` added to it.
pub struct Parsed {
    cli: Cli,
    matches: clap::ArgMatches,
    /// The options the configuration file set.
    from_file: BTreeSet<String>,
}

/// Parses `argv`, with `serve --config FILE` layered under it. Help,
/// version and usage errors are printed and exit here, as clap does.
pub fn parse(argv: Vec<OsString>) -> Result<Parsed, ExitCode> {
    let matches = Cli::command().get_matches_from(&argv);
    let (matches, from_file) = config_file::with_config_file(argv, matches)?;
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok(Parsed {
        cli,
        matches,
        from_file,
    })
}

/// Runs the command; its exit code.
pub fn dispatch(parsed: Parsed) -> ExitCode {
    let Parsed {
        cli,
        matches,
        from_file,
    } = parsed;
    match cli.command {
        Command::Validate { dirs } => validate::validate(&dirs),
        Command::Explain(args) => explain::explain(args),
        Command::Health(args) => health::health(&args),
        Command::Serve(args) if args.print_config => {
            let serve = matches.subcommand_matches("serve").expect("serve matches");
            config_file::print_config(args.config.as_deref(), serve, &from_file)
        }
        Command::Serve(args) => serve::serve(*args),
        Command::Approve(args) => admin::approve(args),
        Command::Revoke(args) => admin::revoke(args),
        Command::Approvals(args) => admin::approvals(args),
        Command::Usage(args) => usage::usage(args),
        Command::Spend(args) => spend::spend(args),
        Command::Pricing(command) => pricing::pricing(command),
    }
}

/// The `serve` subcommand's definition, whose argument names key the
/// configuration file.
fn serve_command() -> clap::Command {
    Cli::command()
        .find_subcommand("serve")
        .expect("serve is a subcommand")
        .clone()
}
