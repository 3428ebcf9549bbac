//! Reading a deployment's settings from its variables: every crate reads its own section
//! through [`Vars`], each variable's default written once, where it is read.

use std::{path::PathBuf, str::FromStr, time::Duration};

use secrecy::SecretString;

use crate::process::BaseEnv;

/// A variable that is set but does not parse.
#[derive(Debug, thiserror::Error)]
#[error("configuration variable {variable} has an invalid value {value:?}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: String,
    pub reason: String,
}

/// The variables of a deployment, as a lookup (the process environment with `.env`, or a map
/// in tests). An empty value counts as unset.
pub struct Vars<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Vars<'a> {
    pub fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self { lookup }
    }
}

/// No variable set: every setting at its default.
pub fn unset(_: &str) -> Option<String> {
    None
}

/// This process's environment, the one place it is read (the application adds `.env`).
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Vars<'_> {
    pub fn string(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.string(name).map(PathBuf::from)
    }

    /// A text value, or `default` when unset.
    pub fn text(&self, name: &str, default: &str) -> String {
        self.string(name).unwrap_or_else(|| default.to_owned())
    }

    /// A base URL (without a trailing slash), or `default` when unset.
    pub fn base_url(&self, name: &str, default: &str) -> String {
        self.text(name, default).trim_end_matches('/').to_owned()
    }

    /// A file or program path, or `default` when unset.
    pub fn path_or(&self, name: &str, default: &str) -> PathBuf {
        self.path(name).unwrap_or_else(|| PathBuf::from(default))
    }

    /// A duration in whole seconds within `min..=max`.
    pub fn secs(
        &self,
        name: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<Duration, ConfigError> {
        self.parse_in(name, default, min, max)
            .map(Duration::from_secs)
    }

    /// A duration in whole milliseconds within `min..=max`.
    pub fn millis(
        &self,
        name: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<Duration, ConfigError> {
        self.parse_in(name, default, min, max)
            .map(Duration::from_millis)
    }

    /// `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
    pub fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        self.parse_with(name, default, parse_bool)
    }

    pub fn parse_with<T>(
        &self,
        name: &'static str,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.string(name) {
            None => Ok(default),
            Some(value) => parse(&value.to_ascii_lowercase()).map_err(|reason| ConfigError {
                variable: name,
                value,
                reason,
            }),
        }
    }

    pub fn parse<T: FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.string(name) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|e: T::Err| ConfigError {
                variable: name,
                reason: e.to_string(),
                value,
            }),
        }
    }

    /// A whole number within `min..=max` (the documented range of the variable).
    pub fn parse_in(
        &self,
        name: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let value = self.parse(name, default)?;
        if !(min..=max).contains(&value) {
            return Err(ConfigError {
                variable: name,
                value: value.to_string(),
                reason: format!("must be between {min} and {max}"),
            });
        }
        Ok(value)
    }

    /// A price in dollars: finite, at least zero, at most a million.
    pub fn price(&self, name: &'static str, default: f64) -> Result<f64, ConfigError> {
        let value: f64 = self.parse(name, default)?;
        if !(value.is_finite() && (0.0..=1_000_000.0).contains(&value)) {
            return Err(ConfigError {
                variable: name,
                value: value.to_string(),
                reason: "must be a number of dollars between 0 and 1000000".to_owned(),
            });
        }
        Ok(value)
    }

    /// A secret; an empty value counts as unset.
    pub fn secret(&self, name: &str) -> Option<SecretString> {
        self.string(name).map(SecretString::from)
    }

    /// These variables, where set, as a subprocess environment.
    pub fn environment(&self, names: &[&str]) -> BaseEnv {
        BaseEnv::new(
            names
                .iter()
                .filter_map(|name| Some(((*name).to_owned(), (self.lookup)(name)?)))
                .filter(|(_, value)| !value.is_empty())
                .collect(),
        )
    }

    /// A comma-separated list of host names (lower-cased; `host:port`; with `wildcards`, also
    /// `*.domain` and `*`). Defaults to `github.com`.
    pub fn hosts(&self, name: &'static str, wildcards: bool) -> Result<Vec<String>, ConfigError> {
        let value = self.string(name).unwrap_or_else(|| "github.com".to_owned());
        let hosts: Vec<String> = value
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let valid = |host: &str| {
            let host = host
                .strip_prefix("*.")
                .filter(|_| wildcards)
                .unwrap_or(host);
            (wildcards && host == "*")
                || (!host.is_empty()
                    && host.len() <= 253
                    && host.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')
                    })
                    && !host.starts_with(['-', '.', ':']))
        };
        match hosts.iter().find(|h| !valid(h)) {
            Some(bad) => Err(ConfigError {
                variable: name,
                value: bad.clone(),
                reason: if wildcards {
                    "expected comma-separated hosts: host, host:port, *.domain or *".to_owned()
                } else {
                    "expected comma-separated hosts: host or host:port".to_owned()
                },
            }),
            None => Ok(hosts),
        }
    }
}

pub fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}
