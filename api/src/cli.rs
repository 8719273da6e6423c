//! The command line: `serve` (default), `migrate`, `openapi`, `keys`, `credits`, `config`, `worker`.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::domain::ids::AccountId;
use crate::service::credits::{self, LedgerKind};
use crate::settings::{ConfigSource, Settings};

/// Enterprise API gateway for batch video generation.
#[derive(Parser, Debug)]
#[command(name = "video-batch-api", version, about)]
pub struct Cli {
    /// Extra TOML file layered over config/base.toml and config/{APP_ENVIRONMENT}.toml (repeatable).
    #[arg(long = "config", global = true, value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP server (migrates the database first).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the customer OpenAPI document, or write all three.
    Openapi {
        /// YAML instead of JSON.
        #[arg(long)]
        yaml: bool,
        /// Write openapi.json, openapi-worker.json and openapi-admin.json into DIR.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// Manage API keys.
    Keys {
        /// Key command.
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage credits.
    Credits {
        /// Credits command.
        #[command(subcommand)]
        command: CreditsCommand,
    },
    /// Inspect configuration.
    Config {
        /// Config command.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run the reference worker against a server.
    Worker(crate::worker_client::WorkerArgs),
}

/// `keys` commands.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Generate a new key: prints it once, and the TOML lines with its hash.
    Generate {
        /// Stable key name (a-z, 0-9, _ and -).
        name: String,
    },
    /// Rotate a configured key: prints a new key once, and the TOML lines that make it the
    /// key while the old one keeps working until the overlap ends.
    Rotate {
        /// Name of a configured key.
        name: String,
        /// How long the old key keeps working (e.g. 24h, 7d, 30m).
        #[arg(long, default_value = "24h")]
        overlap: String,
    },
}

/// `credits` commands.
#[derive(Subcommand, Debug)]
pub enum CreditsCommand {
    /// Grant credits to an account, named directly or by one of its keys (a ledger grant).
    Grant {
        /// Key or account name.
        #[arg(value_name = "KEY_OR_ACCOUNT")]
        key: String,
        /// Credits to add.
        amount: i64,
        /// Note stored in the ledger.
        #[arg(long)]
        note: Option<String>,
    },
    /// Show an account's wallet and latest ledger rows (named directly or by one of its keys).
    Show {
        /// Key or account name.
        #[arg(value_name = "KEY_OR_ACCOUNT")]
        key: String,
    },
}

/// `config` commands.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate every layer and print the effective policy per account and key (secrets redacted).
    Check,
}

fn load(files: &[PathBuf]) -> anyhow::Result<(Settings, ConfigSource)> {
    let source = ConfigSource::from_process(files.to_vec());
    let settings = source.load()?;
    Ok((settings, source))
}

/// Runs the command line.
pub async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let (settings, source) = load(&cli.config)?;
            crate::telemetry::init(settings.log.json);
            let app = crate::Application::build(settings, Some(source)).await?;
            let port = app.port();
            let ops = app
                .ops_port()
                .map(|p| format!("metrics on port {p}"))
                .unwrap_or_else(|| "metrics not served".into());
            tracing::info!(
                port,
                ops_port = app.ops_port(),
                "listening; Swagger UI at http://127.0.0.1:{port}/docs"
            );
            eprintln!(
                "video-batch-api listening on port {port}: docs at http://127.0.0.1:{port}/docs; {ops}"
            );
            app.run_until_stopped().await?;
        }
        Command::Migrate => {
            let (settings, _) = load(&cli.config)?;
            crate::telemetry::init(settings.log.json);
            let db = crate::db::connect(&settings.database).await?;
            crate::db::migrate(&db).await?;
            println!("migrations applied");
        }
        Command::Openapi { yaml, write } => match write {
            Some(dir) => {
                std::fs::create_dir_all(&dir)?;
                for (name, spec) in crate::routes::documents::specs() {
                    let path = dir.join(name);
                    std::fs::write(&path, format!("{spec}\n"))
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!("wrote {}", path.display());
                }
            }
            None if yaml => {
                let doc: serde_json::Value =
                    serde_json::from_str(&crate::routes::documents::specs()[0].1)?;
                print!("{}", serde_yaml::to_string(&doc)?);
            }
            None => println!("{}", crate::routes::documents::specs()[0].1),
        },
        Command::Keys {
            command: KeysCommand::Generate { name },
        } => {
            let (key, hash) = crate::service::keys::generate();
            eprintln!("API key for {name:?} (shown once; store it now):");
            println!("{key}");
            eprintln!("\nAdd to your config:\n");
            eprintln!("[keys.{name}]\nkey_sha256 = \"{hash}\"");
        }
        Command::Keys {
            command: KeysCommand::Rotate { name, overlap },
        } => {
            let (settings, _) = load(&cli.config)?;
            let Some(current) = settings.key(&name) else {
                anyhow::bail!("no key named {name:?} is configured");
            };
            let overlap = humantime::parse_duration(&overlap)
                .ok()
                .filter(|d| !d.is_zero())
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("--overlap {overlap:?} is not a duration like 24h, 7d or 30m")
                })?;
            let until =
                (chrono::Utc::now() + overlap).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let (key, hash) = crate::service::keys::generate();
            eprintln!("New API key for {name:?} (shown once; store it now):");
            println!("{key}");
            eprintln!(
                "\nReplace the key's lines in your config with these, then reload \
                 (the old key works until {until}):\n"
            );
            eprintln!(
                "[keys.{name}]\nkey_sha256 = \"{hash}\"\nprevious_key_sha256 = \"{}\"\n\
                 previous_key_expires_at = \"{until}\"",
                current.key_sha256
            );
        }
        Command::Credits { command } => {
            let (settings, _) = load(&cli.config)?;
            let db = crate::db::connect(&settings.database).await?;
            crate::db::migrate(&db).await?;
            crate::service::keys::sync(&db, &settings).await?;
            match command {
                CreditsCommand::Grant { key, amount, note } => {
                    anyhow::ensure!(
                        (1..=1_000_000_000_000).contains(&amount),
                        "amount must be between 1 and 10^12"
                    );
                    let AccountId(id) = account_named(&db, &key).await?;
                    let txn = crate::db::begin_write(&db).await?;
                    let grant =
                        credits::NewEntry::new(id, LedgerKind::Grant, amount).note(note.as_deref());
                    credits::apply(&txn, grant).await?;
                    txn.commit().await?;
                    let w = credits::wallet(&db, AccountId(id)).await?;
                    println!(
                        "granted {amount} to {key}: balance {} held {} available {}",
                        w.balance,
                        w.held,
                        w.available()
                    );
                }
                CreditsCommand::Show { key } => {
                    let AccountId(id) = account_named(&db, &key).await?;
                    let w = credits::wallet(&db, AccountId(id)).await?;
                    println!(
                        "{key}: balance {} held {} available {}",
                        w.balance,
                        w.held,
                        w.available()
                    );
                    for row in credits::ledger(&db, AccountId(id), 20, None).await? {
                        println!(
                            "  #{:<6} {} {:<8} {:>10}  {}{}",
                            row.id,
                            row.created_at.format("%Y-%m-%d %H:%M:%S"),
                            row.kind.as_str(),
                            row.amount,
                            row.batch_id
                                .map(|b| format!("batch {b} "))
                                .unwrap_or_default(),
                            row.note.unwrap_or_default()
                        );
                    }
                }
            }
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let (settings, _) = load(&cli.config)?;
            println!("configuration is valid\n");
            print!("{}", settings.describe());
        }
        Command::Worker(args) => {
            crate::telemetry::init(false);
            crate::worker_client::run(args).await?;
        }
    }
    Ok(())
}

/// The account a command names: a key's (its account), else an account by name.
async fn account_named(db: &sea_orm::DatabaseConnection, name: &str) -> anyhow::Result<AccountId> {
    if let Some((id, _)) = crate::service::keys::account_of_key(db, name).await? {
        return Ok(id);
    }
    crate::service::keys::account_id_by_name(db, name)
        .await?
        .with_context(|| format!("no key or account named {name:?}"))
}
