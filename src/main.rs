//! The `keygate` command: parse the command line, set up logging, and call into the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use keygate::config::{self, RuntimeFlavor, Settings};
use keygate::keys::{self, CreateOptions};

#[derive(Parser)]
#[command(name = "keygate", version, about = "API-key authentication sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the fronts configured in the file.
    Serve {
        #[arg(long, short, default_value = "keygate.toml")]
        config: PathBuf,
    },
    /// Zero-setup tour: built-in echo upstream, a minted sandbox key, curl lines to try.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Create, list and revoke keys in a snapshot file.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Check snapshot documents.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Check configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Mint a key, store its digest, print the secret once.
    Create(CreateArgs),
    /// List keys (never secrets or digests).
    List {
        #[arg(long)]
        snapshot: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id.
    Revoke {
        #[arg(long)]
        snapshot: PathBuf,
        key_id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct CreateArgs {
    #[arg(long)]
    snapshot: PathBuf,
    #[arg(long)]
    partner: String,
    #[arg(long = "env")]
    environment: String,
    /// Comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "")]
    scopes: Vec<String>,
    /// Defaults to sk_<env>_.
    #[arg(long)]
    prefix: Option<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    org: Option<String>,
    /// RFC 3339.
    #[arg(long)]
    expires_at: Option<String>,
    /// Requests per minute.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// Store an hmac-sha256 digest keyed with the pepper in this environment variable.
    #[arg(long)]
    pepper_env: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Parse a snapshot; exit 1 and name every problem.
    Check {
        file: PathBuf,
        /// Environment variable holding the pepper for hmac-sha256 digests.
        #[arg(long)]
        pepper_env: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration; exit 1 and name every problem.
    Check {
        #[arg(long, short, default_value = "keygate.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    keygate::telemetry::flush_log();
    code
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config: path } => {
            let settings = match config::load(&path) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            init_logging(&settings.log);
            let runtime = build_runtime(&settings)?;
            runtime.block_on(keygate::app::run(settings, async {
                shutdown_signal().await;
                // A second signal cuts the delay and the drain short.
                tokio::spawn(async {
                    shutdown_signal().await;
                    eprintln!("second signal: exiting without waiting for the drain");
                    keygate::telemetry::flush_log();
                    std::process::exit(1);
                });
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { listen } => {
            init_logging(&config::LogSettings {
                level: "warn".into(),
                json: false,
                decisions: config::DecisionLog::None,
                buffered_lines: config::DEFAULT_LOG_BUFFERED_LINES,
            });
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(keygate::demo::run(listen, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(k) => keys_command(k),
        Command::Snapshot(SnapshotCommand::Check { file, pepper_env }) => {
            let pepper = match pepper_env {
                Some(var) => Some(keys::pepper_from_env(&var)?.into()),
                None => None,
            };
            match keygate::snapshot::file::read(&file, pepper, None) {
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::FAILURE)
                }
                Ok(s) => {
                    for q in &s.quarantined {
                        eprintln!("{}: {}: {}", file.display(), q.entry, q.reason);
                    }
                    if s.revision == 0 {
                        eprintln!(
                            "{}: warning: revision 0 is read as \"nothing\" by keygate.sync.v1: a hub serving it sends its sidecars nothing (start revisions at 1)",
                            file.display()
                        );
                    }
                    println!(
                        "{}: revision {}, {} keys usable, {} entries quarantined",
                        file.display(),
                        s.revision,
                        s.key_count(),
                        s.quarantined.len()
                    );
                    Ok(if s.quarantined.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
            }
        }
        Command::Config(ConfigCommand::Check { config: path }) => match config::load(&path) {
            Ok(settings) => {
                // Served all the same (a renewal replaces the files in place), but said.
                let listeners = [
                    (
                        "proxy",
                        settings.proxy.as_ref().and_then(|p| p.tls.as_ref()),
                    ),
                    (
                        "ext_authz",
                        settings.ext_authz.as_ref().and_then(|f| f.tls.as_ref()),
                    ),
                    (
                        "authz_http",
                        settings.authz_http.as_ref().and_then(|f| f.tls.as_ref()),
                    ),
                    (
                        "sync_server",
                        settings.sync_server.as_ref().and_then(|s| s.tls.as_ref()),
                    ),
                ];
                for (section, tls) in listeners {
                    let Some(tls) = tls else { continue };
                    if let Some(at) = keygate::tls::expired_at(tls) {
                        let at = time::OffsetDateTime::from_unix_timestamp(at as i64)
                            .ok()
                            .and_then(|t| {
                                t.format(&time::format_description::well_known::Rfc3339)
                                    .ok()
                            })
                            .unwrap_or_else(|| format!("{at} (Unix time)"));
                        eprintln!(
                            "warning: {section}.tls_cert: {}: the certificate expired at {at}; clients will refuse the handshake",
                            tls.identity.cert.display()
                        );
                    }
                }
                println!("{}: ok", path.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                for p in e.problems() {
                    eprintln!("{p}");
                }
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

fn keys_command(k: KeysCommand) -> anyhow::Result<ExitCode> {
    let now = time::OffsetDateTime::now_utc();
    match k {
        KeysCommand::Create(a) => {
            let pepper = match &a.pepper_env {
                Some(var) => Some(keys::pepper_from_env(var)?),
                None => None,
            };
            let opts = CreateOptions {
                partner: a.partner,
                environment: a.environment,
                scopes: a.scopes.into_iter().filter(|s| !s.is_empty()).collect(),
                prefix: a.prefix,
                name: a.name,
                org: a.org,
                expires_at: a.expires_at,
                rate_limit_per_minute: a.rate_limit,
                pepper,
            };
            let created = keys::create(&a.snapshot, &opts, now)?;
            // The key is in the file already: if its secret cannot be shown (stdout closed or
            // full), say which key to revoke rather than leave an active key nobody holds.
            let shown = writeln!(
                std::io::stdout(),
                "{}",
                keys::render_created(&created, a.json)
            )
            .and_then(|()| std::io::stdout().flush());
            if let Err(e) = shown {
                eprintln!(
                    "error: key {} was added to {} but its secret could not be printed ({e}); revoke it: keygate keys revoke --snapshot {} {}",
                    created.id,
                    a.snapshot.display(),
                    a.snapshot.display(),
                    created.id
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        KeysCommand::List { snapshot, json } => {
            println!("{}", keys::render_list(&keys::list(&snapshot)?, json));
        }
        KeysCommand::Revoke {
            snapshot,
            key_id,
            json,
        } => {
            let revoked = keys::revoke(&snapshot, &key_id, now)?;
            println!("{}", keys::render_revoked(&revoked, json));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr through [`keygate::telemetry::LogWriter`] (never blocking a request), in
/// colour only when stderr is a terminal.
fn init_logging(log: &config::LogSettings) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = keygate::telemetry::LogWriter::new(log.buffered_lines);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    if log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn build_runtime(settings: &Settings) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match settings.runtime.flavor {
        RuntimeFlavor::MultiThread => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if settings.runtime.worker_threads > 0 {
                b.worker_threads(settings.runtime.worker_threads);
            }
            b
        }
        // Thread-per-core: this thread serves one share; app::start adds the others.
        RuntimeFlavor::CurrentThread | RuntimeFlavor::ThreadPerCore => {
            tokio::runtime::Builder::new_current_thread()
        }
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
