//! The checks every field goes through: messages name the file and the field.
use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use secrecy::SecretString;

use super::load::Origins;
use super::*;

/// Checks fields against the files they came from and the environment (`env:` secrets).
pub(super) struct Check<'a> {
    pub(super) origins: &'a Origins<'a>,
    pub(super) env: &'a HashMap<String, String>,
}

impl Check<'_> {
    pub(super) fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: self.origins.of(field),
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub(super) fn positive(&self, field: &str, v: i64) -> Result<u32, ConfigError> {
        if v <= 0 {
            return Err(self.err(field, format!("must be a positive number, got {v}")));
        }
        u32::try_from(v).map_err(|_| self.err(field, format!("is too large: {v}")))
    }

    pub(super) fn secret(&self, field: &str, raw: &str) -> Result<Secret, ConfigError> {
        let value = match raw.strip_prefix("env:") {
            Some(var) => match self.env.get(var) {
                Some(v) if !v.is_empty() => v.clone(),
                Some(_) => {
                    return Err(self.err(field, format!("environment variable {var} is empty")));
                }
                None => {
                    return Err(self.err(field, format!("environment variable {var} is not set")));
                }
            },
            None => raw.to_string(),
        };
        if value.is_empty() {
            return Err(self.err(field, "must not be empty"));
        }
        Ok(Secret(SecretString::from(value)))
    }

    pub(super) fn cidrs(&self, field: &str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
        list.iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| self.err(field, format!("{s:?} is not an IP address or CIDR")))
            })
            .collect()
    }

    pub(super) fn webhook_url(&self, field: &str, url: &str) -> Result<(), ConfigError> {
        match url::Url::parse(url) {
            Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.host().is_some() => {
                Ok(())
            }
            _ => Err(self.err(field, format!("{url:?} is not an absolute http(s) URL"))),
        }
    }

    pub(super) fn whsec(&self, field: &str, raw: &str) -> Result<Secret, ConfigError> {
        let secret = self.secret(field, raw)?;
        crate::domain::secret::decode_whsec(secret.expose()).map_err(|m| self.err(field, m))?;
        Ok(secret)
    }
}
