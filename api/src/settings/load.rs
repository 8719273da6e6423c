//! Loading: the layers (built-in `config/base.toml`, the config folder's `base.toml` and
//! `{environment}.toml`, each `--config` file, `APP__` variables) merged in order, with the
//! origin of every value kept for error messages.
use std::collections::HashMap;
use std::path::PathBuf;

use super::Settings;

/// `config/base.toml` as shipped, compiled in: the one place every default is written.
const BUILT_IN_BASE: &str = include_str!("../../../config/base.toml");
/// How the built-in layer is named in error messages.
const BUILT_IN_NAME: &str = "built-in defaults (config/base.toml)";
use super::raw::RawSettings;

/// A configuration problem, naming where it comes from and which field is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {field}: {message}")]
pub struct ConfigError {
    /// The file or environment variable that set the value.
    pub origin: String,
    /// Dotted path of the field, e.g. `keys.acme.key_sha256`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Where to find the configuration and what to layer on top of it.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    /// Folder with base.toml and `{environment}.toml` (`APP_CONFIG_DIR`, default `config`).
    pub dir: PathBuf,
    /// `APP_ENVIRONMENT`, default `local`.
    pub environment: String,
    /// Extra files given with `--config`, applied in order.
    pub extra_files: Vec<PathBuf>,
    /// Environment variables used for `APP__` overrides and `env:` secrets.
    pub env: HashMap<String, String>,
    /// Read the process environment again on reload.
    pub refresh_env: bool,
}

impl ConfigSource {
    /// Reads `APP_CONFIG_DIR`, `APP_ENVIRONMENT` and the variables from the process environment.
    pub fn from_process(extra_files: Vec<PathBuf>) -> Self {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self {
            dir: env
                .get("APP_CONFIG_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("config")),
            environment: env
                .get("APP_ENVIRONMENT")
                .cloned()
                .unwrap_or_else(|| "local".to_string()),
            extra_files,
            env,
            refresh_env: true,
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![
            self.dir.join("base.toml"),
            self.dir.join(format!("{}.toml", self.environment)),
        ];
        files.extend(self.extra_files.iter().cloned());
        files
    }

    /// Loads, merges and validates every layer.
    pub fn load(&self) -> Result<Settings, ConfigError> {
        let env_name = &self.environment;
        if env_name.is_empty()
            || !env_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError {
                origin: "APP_ENVIRONMENT".into(),
                field: "environment".into(),
                message: format!("invalid environment name {env_name:?}"),
            });
        }
        let files = self.files();
        // The built-in layer: every value a deployment starts from, so that a folder's
        // base.toml (or a test's) may set only what it changes.
        let built_in: toml::Table = BUILT_IN_BASE
            .parse()
            .expect("the built-in config/base.toml is valid TOML");
        let mut layers = vec![(PathBuf::from(BUILT_IN_NAME), built_in)];
        for (i, path) in files.iter().enumerate() {
            let text = std::fs::read_to_string(path).map_err(|e| {
                let message = if i == 1 && e.kind() == std::io::ErrorKind::NotFound {
                    format!(
                        "unknown environment {env_name:?}: {} does not exist",
                        path.display()
                    )
                } else {
                    format!("cannot read file: {e}")
                };
                ConfigError {
                    origin: path.display().to_string(),
                    field: if i == 1 {
                        "environment".into()
                    } else {
                        "-".into()
                    },
                    message,
                }
            })?;
            let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
                origin: path.display().to_string(),
                field: "-".into(),
                message: format!("not valid TOML: {}", e.message()),
            })?;
            layers.push((path.clone(), table));
        }

        let mut builder = config::Config::builder().add_source(config::File::from_str(
            BUILT_IN_BASE,
            config::FileFormat::Toml,
        ));
        for (path, _) in &layers[1..] {
            builder = builder.add_source(config::File::new(
                &path.to_string_lossy(),
                config::FileFormat::Toml,
            ));
        }
        let app_env: config::Map<String, String> = self
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("APP__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("APP")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(app_env)),
        );
        let origins = Origins {
            layers: &layers,
            env: &self.env,
        };
        let merged = builder.build().map_err(|e| ConfigError {
            origin: "configuration".into(),
            field: "-".into(),
            message: e.to_string(),
        })?;
        let raw: RawSettings = serde_path_to_error::deserialize(merged).map_err(|e| {
            let field = e.path().to_string();
            ConfigError {
                origin: origins.of(&field),
                field,
                message: clean_serde_message(&e.inner().to_string()),
            }
        })?;
        raw.validate(&self.environment, &origins, &self.env)
    }
}

fn clean_serde_message(msg: &str) -> String {
    // config appends " for key `...`" or " in ..." on its own; keep the first clause.
    msg.split(" for key ").next().unwrap_or(msg).to_string()
}

pub(super) struct Origins<'a> {
    layers: &'a [(PathBuf, toml::Table)],
    env: &'a HashMap<String, String>,
}

impl Origins<'_> {
    /// The last layer that sets `field` (a dotted path), or the environment variable.
    pub(super) fn of(&self, field: &str) -> String {
        let parts: Vec<&str> = field.split('.').filter(|p| !p.is_empty()).collect();
        let var = format!(
            "APP__{}",
            parts
                .iter()
                .map(|p| p.to_uppercase())
                .collect::<Vec<_>>()
                .join("__")
        );
        if self.env.contains_key(&var) {
            return format!("environment variable {var}");
        }
        for (path, table) in self.layers.iter().rev() {
            if has_path(table, &parts) {
                return path.display().to_string();
            }
        }
        // A missing field: blame the deepest layer that has the parent table.
        if parts.len() > 1 {
            for (path, table) in self.layers.iter().rev() {
                if has_path(table, &parts[..parts.len() - 1]) {
                    return path.display().to_string();
                }
            }
        }
        self.layers
            .get(1)
            .or(self.layers.first())
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_else(|| "configuration".into())
    }
}

fn has_path(table: &toml::Table, parts: &[&str]) -> bool {
    let mut cur = table;
    for (i, part) in parts.iter().enumerate() {
        match cur.get(*part) {
            Some(toml::Value::Table(t)) => cur = t,
            Some(_) => return i + 1 == parts.len(),
            None => return false,
        }
    }
    true
}
