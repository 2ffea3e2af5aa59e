//! `freshplan`: the command line (serve, migrate, seed, token, users, keys, relay, loadtest).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use freshplan::app::{AppState, FollowupParts, Server};
use freshplan::auth::jwt::{self, Authenticator};
use freshplan::auth::users::{self, UserChange, UserRow};
use freshplan::auth::{Principal, Role};
use freshplan::config::Settings;
use freshplan::db::{self, bootstrap, embedded};
use freshplan::pii::{self, Vault};
use freshplan::{demo, telemetry};

#[derive(Parser)]
#[command(
    name = "freshplan",
    version,
    about = "FreshPlan Leads: lead management and Sales Cockpit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// TOML configuration file (dotted keys, see README).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: String,
        /// Bootstrap database, demo users and leads, development keys and login; keep demo activity going.
        #[arg(long)]
        demo: bool,
        /// With --demo: allow an address other than loopback (the demo's login lets anyone act
        /// as any user).
        #[arg(long, requires = "demo")]
        allow_non_loopback: bool,
    },
    /// Create database, roles and schema, or upgrade them (idempotent).
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Load demo data (idempotent).
    Seed {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Required: the only data set there is.
        #[arg(long)]
        demo: bool,
        /// Number of demo leads.
        #[arg(long, default_value_t = 3000)]
        leads: usize,
    },
    /// Print a signed development token.
    Token {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        user: String,
        /// admin, manager, sales or viewer (case-insensitive).
        #[arg(long)]
        role: String,
        /// DE, AT or CH.
        #[arg(long)]
        territory: String,
        /// Display name (default: the user id).
        #[arg(long)]
        name: Option<String>,
        /// Lifetime in hours.
        #[arg(long, default_value_t = 8)]
        ttl_hours: u64,
    },
    /// Manage the user table (through the admin database URL; every change is audited).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// The T+3/T+7 follow-up job.
    Followups {
        #[command(subcommand)]
        command: FollowupsCommand,
    },
    /// Relay committed events from the outbox into NATS JetStream (one active relay per
    /// database; more wait as hot standby). See docs/relay.md.
    Relay {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve `/q/metrics` and `/q/health/ready` of the relay on this address (e.g.
        /// 127.0.0.1:9091; port 0 picks a free one, logged as "relay metrics listening").
        #[arg(long)]
        metrics_bind: Option<String>,
    },
    /// PII key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Drive running instances with open-loop load and report latency, losses and cost
    /// (issue 12; see README "Performance").
    Loadtest(Box<freshplan::loadtest::Args>),
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Add a user.
    Add {
        #[arg(long)]
        config: Option<PathBuf>,
        /// User id: the `sub` of the user's tokens.
        id: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// admin, manager, sales or viewer (case-insensitive).
        #[arg(long)]
        role: String,
        /// DE, AT or CH.
        #[arg(long)]
        territory: String,
    },
    /// Change a user's name, role, territory or active flag.
    Set {
        #[arg(long)]
        config: Option<PathBuf>,
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        territory: Option<String>,
        /// true or false.
        #[arg(long)]
        active: Option<bool>,
    },
    /// Deactivate a user: their tokens are refused and their open streams end (within
    /// freshplan.auth.users.refresh-seconds on every running instance).
    Deactivate {
        #[arg(long)]
        config: Option<PathBuf>,
        id: String,
    },
    /// List the users.
    List {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum FollowupsCommand {
    /// Run the job once (as the system principal), deliver the queued mails and print what
    /// happened.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Use the demo's development keys (the data folder of `serve --demo`).
        #[arg(long)]
        demo: bool,
        /// Only the leads of this territory (DE, AT or CH).
        #[arg(long)]
        territory: Option<String>,
        /// Run as if it were this time (RFC 3339), e.g. to show T+3/T+7 in the demo.
        #[arg(long)]
        at: Option<String>,
        /// How long to keep delivering (retries with backoff) before leaving the rest to the
        /// running service's dispatcher.
        #[arg(long, default_value_t = 120)]
        deliver_seconds: u64,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Re-encrypt every contact value under the active key (resumable, online).
    Rotate {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Rows per transaction.
        #[arg(long, default_value_t = 500)]
        batch: i64,
    },
    /// Print a new key file (one fresh key and a fresh lookup key).
    Generate {
        #[arg(long, default_value = "k1")]
        id: String,
    },
}

/// Where `--demo` keeps its private cluster and development key.
fn demo_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FRESHPLAN_DATA_DIR") {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/tmp/freshplan");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".local/share/freshplan"))
        .unwrap_or_else(|| PathBuf::from(".freshplan"))
}

/// The development JWT secret of the data folder (created by `serve --demo`, read by `token`).
fn demo_secret_file() -> PathBuf {
    demo_dir().join(jwt::DEMO_SECRET_FILE)
}

/// `--demo` listens on loopback only unless told otherwise: its login lets anyone act as anyone.
fn refuse_non_loopback(bind: &str) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = bind
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --bind {bind}"))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!(
            "--demo refuses to listen on {bind}, which is not a loopback address: the demo's login \
             lets anyone act as any user. Use --bind 127.0.0.1:PORT, or add --allow-non-loopback \
             if you really mean it"
        );
    }
    Ok(())
}

fn vault(settings: &Settings, demo: bool) -> anyhow::Result<Vault> {
    match Vault::from_settings(&settings.pii)? {
        Some(v) => Ok(v),
        None if demo => Vault::development(&demo_dir().join("dev-pii-keys.toml")),
        None => bail!(
            "no PII key configured: set freshplan.pii.key-file (create one with `freshplan keys generate > keys.toml`) \
             or freshplan.pii.keys and freshplan.pii.lookup-key; `serve --demo` generates a development key"
        ),
    }
}

async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let target = bootstrap::Target::from_url(&settings.database_url, &settings.owner_role)?;
    bootstrap::migrate(&settings.admin_database_url, &target).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

/// `freshplan relay`: the relay alone, until SIGTERM or Ctrl-C.
async fn relay(config: Option<&Path>, metrics_bind: Option<&str>) -> anyhow::Result<()> {
    use axum::routing::get;
    use freshplan::events::relay::Relay;
    use freshplan::telemetry::metrics::Metrics;
    use std::sync::Arc;

    let settings = Settings::load(config)?;
    settings.refuse_development_switches()?;
    let metrics = Arc::new(Metrics::new());
    let relay = Relay::new(&settings.database_url, &settings.relay, metrics.clone());
    let health = relay.health.clone();
    let http = match metrics_bind {
        Some(bind) => {
            let listener = tokio::net::TcpListener::bind(bind)
                .await
                .with_context(|| format!("cannot bind {bind}"))?;
            let addr = listener.local_addr()?;
            let ready = move || {
                let state = health.get();
                let up = state != freshplan::events::relay::RelayState::Down;
                let word = if up { "UP" } else { "DOWN" };
                let code = if up {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                };
                let body = serde_json::json!({"status": word, "checks": [
                    {"name": "relay", "status": word, "data": {"state": state.as_str()}}]});
                async move { (code, axum::Json(body)) }
            };
            let app = axum::Router::new()
                .route(
                    "/q/metrics",
                    get(telemetry::metrics::metrics_endpoint).with_state(metrics.clone()),
                )
                .route("/q/health/ready", get(ready))
                .route("/q/health/live", get(telemetry::health::live));
            tracing::info!(%addr, "relay metrics listening");
            Some(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }))
        }
        None => None,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(relay.run(stopped));
    shutdown_signal().await;
    tracing::info!("relay shutting down");
    let _ = stop.send(true);
    let _ = task.await;
    if let Some(http) = http {
        http.abort();
    }
    Ok(())
}

async fn serve(
    config: Option<&Path>,
    bind: &str,
    demo_mode: bool,
    allow_non_loopback: bool,
) -> anyhow::Result<()> {
    let mut settings = Settings::load(config)?;
    let mut cluster = None;
    if !demo_mode {
        settings.refuse_development_switches()?;
    }
    if demo_mode {
        if !allow_non_loopback {
            refuse_non_loopback(bind)?;
        }
        settings.dev_login = true;
        settings.demo = true;
        let jwt = &mut settings.jwt;
        if jwt.secret.is_empty() && jwt.public_key_file.is_none() && jwt.jwks_file.is_none() {
            jwt::ensure_demo_secret(&demo_secret_file())?;
            jwt.demo_secret_file = Some(demo_secret_file());
        }
        if !embedded::answers(&settings.admin_database_url).await {
            tracing::warn!(
                "nothing answers at the admin database address: starting a private cluster"
            );
            cluster = Some(embedded::EmbeddedCluster::start(
                &demo_dir().join("pgdata"),
                &settings.admin_database_url,
            )?);
        }
        migrate(&settings).await?;
    }
    let vault = vault(&settings, demo_mode)?;
    let auth = Authenticator::from_settings(&settings.jwt, demo_mode)?;
    let state = AppState::connect(settings, auth, vault).await?;
    if demo_mode {
        let report = demo::seed(&state.pool, &state.vault, 3000).await?;
        tracing::info!(
            leads = report.leads,
            activities = report.activities,
            "demo data ready"
        );
    }
    let server = Server::start(state, bind).await?;
    let live = demo_mode.then(|| demo::spawn_live_activity(server.state.leads.clone()));
    if demo_mode {
        eprintln!(
            "FreshPlan Leads demo on {}/  — log in at {}/login, or: freshplan token --user sales-de-1 --role sales --territory DE",
            server.url(),
            server.url()
        );
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    if let Some(live) = live {
        live.abort();
    }
    server.stop().await;
    drop(cluster);
    Ok(())
}

async fn followups_run(
    config: Option<&Path>,
    demo_keys: bool,
    territory: Option<String>,
    at: Option<String>,
    deliver_seconds: u64,
) -> anyhow::Result<()> {
    let settings = Settings::load(config)?;
    if !settings.followup.enabled {
        bail!("follow-ups are switched off (freshplan.followup.enabled = false)");
    }
    let territory = territory
        .map(|t| t.parse().map_err(anyhow::Error::msg))
        .transpose()?;
    let at = at
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(&t)
                .map(|t| t.with_timezone(&chrono::Utc))
                .with_context(|| format!("--at {t}: expected an RFC 3339 time"))
        })
        .transpose()?;
    let vault = std::sync::Arc::new(vault(&settings, demo_keys)?);
    let pool = db::connect(&settings.database_url, 4, "freshplan-followups").await?;
    db::check_runtime_role(&pool).await?;
    let metrics = std::sync::Arc::new(telemetry::metrics::Metrics::new());
    let publisher = freshplan::events::Publisher::new(metrics.clone());
    let parts = FollowupParts::new(&settings, &pool, &vault, &metrics, &publisher)?;
    if let Some(at) = at {
        parts.clock.set(at);
    }
    let report = parts.job.run(&Principal::system(), territory).await?;
    println!(
        "queued {} T+3 and {} T+7 follow-up mails at {} ({} failed at once)",
        report.t3_queued,
        report.t7_queued,
        report.processed_at.to_rfc3339(),
        report.failed
    );
    let delivered = parts
        .mail
        .drain(std::time::Duration::from_secs(deliver_seconds))
        .await?;
    println!(
        "delivered {}, failed after the last attempt {}, still retrying {}",
        delivered.sent, delivered.failed, delivered.retrying
    );
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Followups {
            command:
                FollowupsCommand::Run {
                    config,
                    demo,
                    territory,
                    at,
                    deliver_seconds,
                },
        } => followups_run(config.as_deref(), demo, territory, at, deliver_seconds).await,
        Command::Serve {
            config,
            bind,
            demo,
            allow_non_loopback,
        } => serve(config.as_deref(), &bind, demo, allow_non_loopback).await,
        Command::Migrate { config } => {
            let settings = Settings::load(config.as_deref())?;
            migrate(&settings).await?;
            println!(
                "database {} is migrated",
                db::redact_url(&settings.database_url)
            );
            Ok(())
        }
        Command::Seed {
            config,
            demo: demo_flag,
            leads,
        } => {
            if !demo_flag {
                bail!("only demo data can be seeded: use `freshplan seed --demo`");
            }
            let settings = Settings::load(config.as_deref())?;
            let vault = vault(&settings, true)?;
            let pool = db::connect(&settings.database_url, 4, "freshplan-seed").await?;
            db::check_runtime_role(&pool).await?;
            let r = demo::seed(&pool, &vault, leads).await?;
            println!(
                "seeded {} users, {} leads, {} activities (existing rows kept)",
                r.users, r.leads, r.activities
            );
            Ok(())
        }
        Command::Token {
            config,
            user,
            role,
            territory,
            name,
            ttl_hours,
        } => {
            let mut settings = Settings::load(config.as_deref())?;
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            if role == Role::System {
                bail!("the system principal is for background jobs and has no tokens");
            }
            let territory = territory.parse().map_err(anyhow::Error::msg)?;
            let jwt = &mut settings.jwt;
            if jwt.secret.is_empty() && jwt.public_key_file.is_none() && jwt.jwks_file.is_none() {
                // The data folder's secret, the one `serve --demo` uses (whichever comes first
                // creates it).
                jwt::ensure_demo_secret(&demo_secret_file())?;
                jwt.demo_secret_file = Some(demo_secret_file());
            }
            let auth = Authenticator::from_settings(&settings.jwt, true)?;
            let p = Principal {
                name: name.unwrap_or_else(|| user.clone()),
                user_id: user,
                role,
                territory,
            };
            println!("{}", auth.mint(&p, ttl_hours * 3600)?);
            Ok(())
        }
        Command::Users { command } => run_users(command).await,
        Command::Relay {
            config,
            metrics_bind,
        } => relay(config.as_deref(), metrics_bind.as_deref()).await,
        Command::Loadtest(args) => {
            freshplan::loadtest::run_command(*args, &demo_secret_file()).await
        }
        Command::Keys {
            command: KeysCommand::Generate { id },
        } => {
            print!("{}", pii::new_key_file(&id));
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Rotate { config, batch },
        } => {
            let settings = Settings::load(config.as_deref())?;
            let vault = vault(&settings, false)?;
            let pool = db::connect(&settings.database_url, 2, "freshplan-keys").await?;
            db::check_runtime_role(&pool).await?;
            let r = pii::rotate::rotate(&pool, &vault, batch.clamp(1, 10_000)).await?;
            println!(
                "re-encrypted {} leads in {} batches under key `{}`",
                r.rows,
                r.batches,
                vault.active_key_id()
            );
            if !r.unreadable.is_empty() {
                let shown: Vec<String> = r
                    .unreadable
                    .iter()
                    .take(20)
                    .map(|id| id.to_string())
                    .collect();
                bail!(
                    "{} leads were left under their old key because their contact data does not decrypt \
                     (altered or copied in the database): {}{}; restore them from a backup or re-enter their contact data",
                    r.unreadable.len(),
                    shown.join(", "),
                    if r.unreadable.len() > shown.len() { ", …" } else { "" }
                );
            }
            Ok(())
        }
    }
}

/// A connection to the runtime database as the administrator, acting as the owner role (like
/// `migrate`), so row-level security applies to what `users` does there.
async fn admin_connection(settings: &Settings) -> anyhow::Result<sqlx::PgConnection> {
    use sqlx::{ConnectOptions, Executor};
    use std::str::FromStr;
    let target = bootstrap::Target::from_url(&settings.database_url, &settings.owner_role)?;
    let options = sqlx::postgres::PgConnectOptions::from_str(&settings.admin_database_url)
        .context("freshplan.database.admin-url is not a valid PostgreSQL URL")?
        .database(&target.database)
        .application_name("freshplan-users");
    let mut conn = options.connect().await.with_context(|| {
        format!(
            "cannot connect to database `{}` as administrator ({}); set FRESHPLAN_ADMIN_DATABASE_URL",
            target.database,
            db::redact_url(&settings.admin_database_url)
        )
    })?;
    let owner = target.owner_role.replace('"', "\"\"");
    conn.execute(format!("SET ROLE \"{owner}\"").as_str())
        .await
        .context("cannot act as the owner role (run `freshplan migrate` first)")?;
    Ok(conn)
}

/// Who the audit trail names for a `users` command: `cli:<login name>`.
fn operator() -> String {
    let login = std::env::var("LOGNAME")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| {
            // SAFETY: getuid has no preconditions.
            format!("uid-{}", unsafe { libc::getuid() })
        });
    format!("cli:{login}")
}

fn print_user(verb: &str, u: &UserRow) {
    println!(
        "{verb} user {} ({}, {}, {}, {})",
        u.id,
        u.name,
        u.role,
        u.territory,
        if u.active { "active" } else { "deactivated" }
    );
}

async fn run_users(command: UsersCommand) -> anyhow::Result<()> {
    let config = match &command {
        UsersCommand::Add { config, .. }
        | UsersCommand::Set { config, .. }
        | UsersCommand::Deactivate { config, .. }
        | UsersCommand::List { config } => config.clone(),
    };
    let settings = Settings::load(config.as_deref())?;
    let role = |r: &str| r.parse::<Role>().map_err(anyhow::Error::msg);
    let territory = |t: &str| t.parse().map_err(anyhow::Error::msg);
    let actor = operator();
    match command {
        UsersCommand::Add {
            id,
            name,
            role: r,
            territory: t,
            ..
        } => {
            let (r, t) = (role(&r)?, territory(&t)?);
            let mut conn = admin_connection(&settings).await?;
            print_user(
                "added",
                &users::add(&mut conn, &actor, &id, &name, r, t).await?,
            );
        }
        UsersCommand::Set {
            id,
            name,
            role: r,
            territory: t,
            active,
            ..
        } => {
            let change = UserChange {
                name,
                role: r.as_deref().map(role).transpose()?,
                territory: t.as_deref().map(territory).transpose()?,
                active,
            };
            let mut conn = admin_connection(&settings).await?;
            print_user(
                "changed",
                &users::set(&mut conn, &actor, &id, change).await?,
            );
        }
        UsersCommand::Deactivate { id, .. } => {
            let change = UserChange {
                active: Some(false),
                ..Default::default()
            };
            let mut conn = admin_connection(&settings).await?;
            print_user(
                "changed",
                &users::set(&mut conn, &actor, &id, change).await?,
            );
            println!(
                "running instances refuse the user's tokens and end their streams within {} s",
                settings.users_refresh_seconds
            );
        }
        UsersCommand::List { .. } => {
            let mut conn = admin_connection(&settings).await?;
            println!("id\tname\trole\tterritory\tactive");
            for u in users::list(&mut conn, &actor).await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    u.id, u.name, u.role, u.territory, u.active
                );
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    telemetry::init_logging();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await.context("freshplan") {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
