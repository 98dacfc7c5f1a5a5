//! The `serve` configuration file, layered under the environment and flags.
//!
//! Nothing here names an option. The file's keys are matched against the
//! long names of whatever arguments the `serve` command declares, so an
//! option added to the command later is settable from the file with no
//! change here. A file value is applied only where the argument did not
//! come from the command line or the environment, which gives the
//! precedence flag > environment > file > default.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

use tollgate_core::policy::yaml::{self, Node, Pos, Value};

/// Arguments (by long name) that are about the configuration itself,
/// never in the file.
const NOT_IN_FILE: &[&str] = &["help", "version", "config", "print-config"];

/// A problem in the configuration file, with its position when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub pos: Option<Pos>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(pos) => write!(f, "{}:{pos}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// One key of the file, resolved to the argument it sets.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    long: String,
    /// `None` for a flag set to false, which is the same as leaving it out.
    values: Option<Vec<String>>,
}

/// The file's settings, checked against `cmd`'s arguments.
#[derive(Debug, Clone)]
pub struct FileConfig {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl FileConfig {
    /// Reads `path` and resolves every key against `cmd`, reporting every
    /// unknown key and bad value rather than only the first.
    pub fn load(path: &Path, cmd: &Command) -> Result<FileConfig, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigError {
                file: path.to_path_buf(),
                pos: None,
                message: format!("cannot read: {e}"),
            }]
        })?;
        Self::parse(path, &text, cmd)
    }

    pub fn parse(path: &Path, text: &str, cmd: &Command) -> Result<FileConfig, Vec<ConfigError>> {
        let err = |pos: Option<Pos>, message: String| ConfigError {
            file: path.to_path_buf(),
            pos,
            message,
        };
        let root = yaml::parse(text).map_err(|e| vec![err(Some(e.pos), e.message)])?;
        let pairs = match root {
            None => Vec::new(),
            Some(Node {
                value: Value::Map(pairs),
                ..
            }) => pairs,
            Some(other) => {
                return Err(vec![err(
                    Some(other.pos),
                    format!(
                        "expected a mapping of option names, found a {}",
                        other.kind()
                    ),
                )])
            }
        };
        let mut errors = Vec::new();
        let mut entries: Vec<Entry> = Vec::new();
        for (key, value) in pairs {
            let name = match &key.value {
                Value::Scalar { text, .. } => text.clone(),
                _ => {
                    errors.push(err(Some(key.pos), "an option name must be a string".into()));
                    continue;
                }
            };
            let Some(arg) = file_arg(cmd, &name) else {
                errors.push(err(
                    Some(key.pos),
                    format!("unknown option `{name}`; see `tollgate serve --help`"),
                ));
                continue;
            };
            let long = arg.get_long().unwrap_or_default().to_string();
            if entries.iter().any(|e| e.long == long) {
                errors.push(err(Some(key.pos), format!("`{name}` is set twice")));
                continue;
            }
            match entry_values(arg, &value) {
                Ok(values) => {
                    for v in values.iter().flatten() {
                        if let Err(message) = check_value(arg, v) {
                            errors.push(err(Some(value.pos), format!("`{name}`: {message}")));
                        }
                    }
                    entries.push(Entry {
                        id: arg.get_id().as_str().to_string(),
                        long,
                        values,
                    });
                }
                Err(message) => errors.push(err(Some(value.pos), format!("`{name}` {message}"))),
            }
        }
        if errors.is_empty() {
            Ok(FileConfig {
                path: path.to_path_buf(),
                entries,
            })
        } else {
            Err(errors)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flags that add the file's settings to an argv already parsed into
    /// `matches`, skipping every argument set on the command line or in the
    /// environment. Append them and parse again.
    pub fn extra_args(&self, matches: &ArgMatches) -> (Vec<OsString>, BTreeSet<String>) {
        let mut args = Vec::new();
        let mut applied = BTreeSet::new();
        for e in &self.entries {
            if matches!(
                matches.value_source(&e.id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            // A flag set to false in the file adds nothing, but the value
            // in force still came from the file.
            applied.insert(e.id.clone());
            let Some(values) = &e.values else { continue };
            if values.is_empty() {
                args.push(OsString::from(format!("--{}", e.long)));
            }
            for v in values {
                args.push(OsString::from(format!("--{}={v}", e.long)));
            }
        }
        (args, applied)
    }

    /// The values the file gives the argument `id`, if it sets it.
    pub fn values_of(&self, id: &str) -> Option<&[String]> {
        self.entries
            .iter()
            .find(|e| e.id == id)
            .and_then(|e| e.values.as_deref())
    }
}

/// The argument a file key names: its long name, in kebab or snake case.
fn file_arg<'a>(cmd: &'a Command, key: &str) -> Option<&'a Arg> {
    let long = key.replace('_', "-");
    cmd.get_arguments()
        .filter(|a| a.get_long().is_some_and(|l| !NOT_IN_FILE.contains(&l)))
        .find(|a| a.get_long() == Some(long.as_str()))
}

fn takes_no_value(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
}

/// The flag values a YAML value stands for: `Some(vec![])` for a flag that
/// is on, `None` for one that is off.
fn entry_values(arg: &Arg, value: &Node) -> Result<Option<Vec<String>>, String> {
    let scalar = |n: &Node| match &n.value {
        Value::Scalar { text, .. } => Ok(text.clone()),
        Value::Null => Err("needs a value".to_string()),
        _ => Err(format!("must be a single value, not {}", n.kind())),
    };
    if takes_no_value(arg) {
        return match &value.value {
            Value::Scalar {
                text,
                quoted: false,
            } if text == "true" => {
                Ok(Some(Vec::new()).filter(|_| matches!(arg.get_action(), ArgAction::SetTrue)))
            }
            Value::Scalar {
                text,
                quoted: false,
            } if text == "false" => {
                Ok(Some(Vec::new()).filter(|_| matches!(arg.get_action(), ArgAction::SetFalse)))
            }
            _ => Err("must be true or false".to_string()),
        };
    }
    match (&value.value, arg.get_action()) {
        (Value::Seq(items), ArgAction::Append) => {
            items.iter().map(scalar).collect::<Result<_, _>>().map(Some)
        }
        (Value::Seq(_), _) => Err("takes one value, not a list".to_string()),
        _ => scalar(value).map(|v| Some(vec![v])),
    }
}

/// Runs the argument's own parser on a file value, so that a bad value is
/// reported at its place in the file rather than as a bad flag.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    // A fresh positional argument with the same parser: a clone would keep
    // relations such as `requires`, naming arguments this probe lacks.
    let mut single = Arg::new(arg.get_id().clone())
        .value_parser(arg.get_value_parser().clone())
        .allow_hyphen_values(true)
        .required(true);
    if let Some(name) = arg.get_value_names().and_then(|n| n.first()) {
        single = single.value_name(name.clone());
    }
    let probe = Command::new("config").no_binary_name(true).arg(single);
    match probe.try_get_matches_from([value]) {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            Err(first.trim_start_matches("error: ").to_string())
        }
    }
}

/// The effective configuration as a YAML file `--config` accepts, each line
/// saying where its value came from, with credentials replaced.
pub fn render(cmd: &Command, matches: &ArgMatches, from_file: &BTreeSet<String>) -> String {
    let mut out =
        String::from("# Effective configuration; each line says where its value came from.\n");
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        if NOT_IN_FILE.contains(&long) {
            continue;
        }
        let source = if from_file.contains(id) {
            "file"
        } else {
            match matches.value_source(id) {
                Some(ValueSource::CommandLine) => "flag",
                Some(ValueSource::EnvVariable) => "env",
                Some(ValueSource::DefaultValue) => "default",
                _ => "unset",
            }
        };
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|vs| {
                vs.map(|v| redact(long, &v.to_string_lossy()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let line = if takes_no_value(arg) {
            let on = values.first().map(|v| v == "true").unwrap_or(false);
            format!("{long}: {on}")
        } else if values.is_empty() {
            format!("# {long}:")
        } else if matches!(arg.get_action(), ArgAction::Append) {
            let items: Vec<String> = values.iter().map(|v| quote(v)).collect();
            format!("{long}: [{}]", items.join(", "))
        } else {
            format!("{long}: {}", quote(&values[0]))
        };
        out.push_str(&format!("{line:<60} # {source}\n"));
    }
    out
}

/// A YAML double-quoted scalar; JSON's string syntax is a subset of it.
fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

pub(crate) const REDACTED: &str = "<redacted>";

/// Hides credentials: the whole value of an option whose name says it is a
/// secret, and the password in any URL's userinfo (every URL of a
/// comma-separated list).
pub(crate) fn redact(name: &str, value: &str) -> String {
    let name = name.to_ascii_lowercase();
    if ["password", "secret", "token"]
        .iter()
        .any(|w| name.contains(w))
    {
        return REDACTED.to_string();
    }
    value
        .split(',')
        .map(redact_url)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_string();
    };
    let rest = &s[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return s.to_string();
    };
    let userinfo = &rest[..at];
    let user = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:"),
        // `redis://secret@host` puts the password where the user would be.
        None => String::new(),
    };
    format!("{}{user}{REDACTED}{}", &s[..scheme_end + 3], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> Command {
        Command::new("serve")
            .arg(Arg::new("listen").long("listen").default_value("a"))
            .arg(
                Arg::new("policies")
                    .long("policies")
                    .action(ArgAction::Append),
            )
            .arg(
                Arg::new("allow_empty")
                    .long("allow-empty")
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("store_timeout_ms")
                    .long("store-timeout-ms")
                    .value_parser(clap::value_parser!(u64)),
            )
            .arg(Arg::new("config").long("config"))
            .arg(Arg::new("tls_cert").long("tls-cert").requires("tls_key"))
            .arg(Arg::new("tls_key").long("tls-key").requires("tls_cert"))
            .arg(
                Arg::new("print_config")
                    .long("print-config")
                    .action(ArgAction::SetTrue),
            )
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported_with_positions() {
        let text = "listen: x\nbogus: 1\nstore_timeout_ms: fast\nconfig: y\nallow-empty: 3\nprint_config: true\n";
        let errors = FileConfig::parse(Path::new("t.yaml"), text, &cmd()).unwrap_err();
        let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown.len(), 5, "{shown:#?}");
        assert!(shown[4].starts_with("t.yaml:6:1: unknown option `print_config`"));
        assert!(shown[0].starts_with("t.yaml:2:1: unknown option `bogus`"));
        assert!(shown[1].starts_with("t.yaml:3:19: `store_timeout_ms`: invalid value 'fast'"));
        assert!(shown[2].starts_with("t.yaml:4:1: unknown option `config`"));
        assert!(shown[3].starts_with("t.yaml:5:14: `allow-empty` must be true or false"));
    }

    #[test]
    fn arguments_that_require_others_can_be_set_from_the_file() {
        let file = FileConfig::parse(Path::new("t.yaml"), "tls-cert: c.pem\n", &cmd()).unwrap();
        assert_eq!(file.values_of("tls_cert"), Some(&["c.pem".to_string()][..]));
    }

    #[test]
    fn file_values_fill_only_what_the_command_line_left_unset() {
        let text = "listen: from-file\npolicies: [a, b]\nallow_empty: true\n";
        let file = FileConfig::parse(Path::new("t.yaml"), text, &cmd()).unwrap();
        let m = cmd()
            .no_binary_name(true)
            .try_get_matches_from(["--listen", "flag"])
            .unwrap();
        let (extra, applied) = file.extra_args(&m);
        assert_eq!(
            extra,
            ["--policies=a", "--policies=b", "--allow-empty"].map(OsString::from)
        );
        assert_eq!(
            applied.into_iter().collect::<Vec<_>>(),
            ["allow_empty", "policies"]
        );
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            redact("redis", "redis://:pw@h:6379/0,rediss://u:p@h2"),
            "redis://:<redacted>@h:6379/0,rediss://u:<redacted>@h2"
        );
        assert_eq!(redact("redis", "redis://pw@h"), "redis://<redacted>@h");
        assert_eq!(redact("redis", "redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact("admin-token", "abc"), REDACTED);
    }
}
