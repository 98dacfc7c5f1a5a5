//! Value parsers and `NAME=VALUE` lists shared by several commands.

use std::time::Duration;

use tollgate_core::engine::Attributes;
use tollgate_core::policy::{parse_duration, Attr};

pub(crate) fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is not a duration such as 30s, 10m or 1h"))
}

pub(crate) fn retry_within_arg(s: &str) -> Result<Duration, String> {
    let d = duration_arg(s)?;
    let max = tollgate_core::engine::decide::MAX_RETRY_WITHIN_SECS;
    if d.as_secs() > max {
        return Err(format!(
            "{s:?} is over {max}s: SDKs do not wait for a Retry-After that long"
        ));
    }
    Ok(d)
}

pub(crate) fn rate_arg(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| format!("{s:?} is not a rate between 0 and 1"))
}

/// `--attr NAME=VALUE` pairs as request attributes; `model_family` is
/// refused, since it is derived from the model.
pub(crate) fn parse_attrs(pairs: &[String]) -> Result<Attributes, String> {
    let mut attributes = Attributes::default();
    for pair in pairs {
        let (name, value) = split_pair(pair)?;
        let attr = Attr::parse(name)
            .filter(|a| *a != Attr::ModelFamily)
            .ok_or_else(|| {
                format!("unknown attribute {name:?}; model_family is derived from the model")
            })?;
        attributes.set(&attr, value.to_string());
    }
    Ok(attributes)
}

pub(crate) fn split_pair(pair: &str) -> Result<(&str, &str), String> {
    pair.split_once('=')
        .ok_or_else(|| format!("{pair:?} is not NAME=VALUE"))
}
