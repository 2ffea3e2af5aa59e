//! Settings and feature toggles: defaults → TOML file → environment, validated at start.
//!
//! Keys are the dotted property names of CONTRACT.md (`features.dashboard.lead-widget.enabled`).
//! Every key can be overridden by an environment variable named after it, upper-cased, with `.`
//! and `-` turned into `_` (`FEATURES_DASHBOARD_LEAD_WIDGET_ENABLED`). `DATABASE_URL` and
//! `FRESHPLAN_ADMIN_DATABASE_URL` are accepted as the conventional names of the two database keys.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;

/// One known key: its dotted name, default (as TOML text) and what it means.
struct Key {
    name: &'static str,
    default: &'static str,
    alias_env: Option<&'static str>,
    doc: &'static str,
}

const KEYS: &[Key] = &[
    Key {
        name: "features.dashboard.lead-widget.enabled",
        default: "true",
        alias_env: None,
        doc: "false: widget endpoint answers 404 feature-disabled",
    },
    Key {
        name: "features.events.cross-module.enabled",
        default: "true",
        alias_env: None,
        doc: "false: consumers are no-ops, events wait in the outbox",
    },
    Key {
        name: "features.metrics.prometheus.enabled",
        default: "true",
        alias_env: None,
        doc: "false: /q/metrics answers 404",
    },
    Key {
        name: "freshplan.security.allow-unauthenticated-publisher",
        default: "false",
        alias_env: None,
        doc: "tests and --demo only (refused otherwise): an anonymous change acts as anonymous-publisher",
    },
    Key {
        name: "freshplan.security.rls.enabled",
        default: "true",
        alias_env: None,
        doc: "false is refused at start",
    },
    Key {
        name: "freshplan.database.url",
        default: "\"postgres://freshplan_app@127.0.0.1:5432/freshplan\"",
        alias_env: Some("DATABASE_URL"),
        doc: "runtime database and the application role it logs in as",
    },
    Key {
        name: "freshplan.database.admin-url",
        default: "\"postgres://postgres@127.0.0.1:5432/postgres\"",
        alias_env: Some("FRESHPLAN_ADMIN_DATABASE_URL"),
        doc: "used only by migrate and serve --demo",
    },
    Key {
        name: "freshplan.database.owner-role",
        default: "\"freshplan_owner\"",
        alias_env: None,
        doc: "role that owns the schema (never logs in)",
    },
    Key {
        name: "freshplan.database.pool-size",
        default: "16",
        alias_env: None,
        doc: "runtime connections per instance",
    },
    Key {
        name: "freshplan.auth.jwt.secret",
        default: "\"\"",
        alias_env: None,
        doc: "HS256 secret (at least 32 bytes)",
    },
    Key {
        name: "freshplan.auth.jwt.public-key-file",
        default: "\"\"",
        alias_env: None,
        doc: "RS256 public key (PEM)",
    },
    Key {
        name: "freshplan.auth.jwt.jwks-file",
        default: "\"\"",
        alias_env: None,
        doc: "RS256 keys as a JWKS file",
    },
    Key {
        name: "freshplan.auth.jwt.issuer",
        default: "\"\"",
        alias_env: None,
        doc: "required iss claim, if set",
    },
    Key {
        name: "freshplan.auth.jwt.audience",
        default: "\"\"",
        alias_env: None,
        doc: "required aud claim (Keycloak client id), if set",
    },
    Key {
        name: "freshplan.auth.jwt.max-lifetime-seconds",
        default: "43200",
        alias_env: None,
        doc: "tokens whose exp lies further ahead are refused",
    },
    Key {
        name: "freshplan.auth.users.refresh-seconds",
        default: "5",
        alias_env: None,
        doc: "user rows are cached this long; streams of deactivated users end within it",
    },
    Key {
        name: "freshplan.auth.dev-login.enabled",
        default: "false",
        alias_env: None,
        doc: "development login page and session cookie (--demo only; refused otherwise)",
    },
    Key {
        name: "freshplan.auth.cookie-secure",
        default: "\"auto\"",
        alias_env: None,
        doc: "Secure flag of the session cookie: auto (on outside --demo), true or false",
    },
    Key {
        name: "freshplan.pii.key-file",
        default: "\"\"",
        alias_env: None,
        doc: "TOML file with PII keys (active, lookup-key, [keys])",
    },
    Key {
        name: "freshplan.pii.keys",
        default: "\"\"",
        alias_env: None,
        doc: "PII keys inline: id:base64,id:base64 (last is active)",
    },
    Key {
        name: "freshplan.pii.lookup-key",
        default: "\"\"",
        alias_env: None,
        doc: "HMAC key for contact lookup hashes (base64, 32 bytes)",
    },
    Key {
        name: "freshplan.events.poll-interval-ms",
        default: "1000",
        alias_env: None,
        doc: "catch-up poll covering a lost doorbell",
    },
    Key {
        name: "freshplan.events.outbox-retention-hours",
        default: "168",
        alias_env: None,
        doc: "consumed outbox rows older than this are pruned (fractions allowed)",
    },
    Key {
        name: "freshplan.events.inbox-retention-hours",
        default: "336",
        alias_env: None,
        doc: "inbox rows kept at least as long as the outbox, and never beyond the durable cursor",
    },
    Key {
        name: "freshplan.events.retention-interval-seconds",
        default: "3600",
        alias_env: None,
        doc: "how often the retention job runs (and once at start)",
    },
    Key {
        name: "freshplan.events.max-unsettled-rows",
        default: "100000",
        alias_env: None,
        doc: "rows the listener handled ahead of the durable cursor that it remembers; at the bound live delivery waits for the cursor",
    },
    Key {
        name: "freshplan.events.dedupe-cache-size",
        default: "65536",
        alias_env: None,
        doc: "in-memory dedupe entries in front of the inbox",
    },
    Key {
        name: "freshplan.events.sse-queue-size",
        default: "256",
        alias_env: None,
        doc: "per-subscriber queue; overflow sends one resync",
    },
    Key {
        name: "freshplan.events.sse-keepalive-seconds",
        default: "15",
        alias_env: None,
        doc: "SSE keep-alive comment interval",
    },
    Key {
        name: "freshplan.cockpit.widget-max-staleness-ms",
        default: "1000",
        alias_env: None,
        doc: "an answer of the widget without minPosition may miss events of at most this many ms (0: recomputed after every event)",
    },
    Key {
        name: "freshplan.stream.max-per-principal",
        default: "5",
        alias_env: None,
        doc: "open SSE streams per user and instance; the oldest gets event: replaced",
    },
    Key {
        name: "freshplan.http.max-body-bytes",
        default: "65536",
        alias_env: None,
        doc: "larger request bodies answer 413",
    },
    Key {
        name: "freshplan.http.max-connections",
        default: "1024",
        alias_env: None,
        doc: "open connections per instance; one beyond is closed at once",
    },
    Key {
        name: "freshplan.http.header-timeout-seconds",
        default: "10",
        alias_env: None,
        doc: "time to send a request head, and idle time between requests",
    },
    Key {
        name: "freshplan.followup.enabled",
        default: "true",
        alias_env: None,
        doc: "false: no scheduled or on-demand follow-up runs (queued mails are still delivered)",
    },
    Key {
        name: "freshplan.followup.cron",
        default: "\"0 9 * * *\"",
        alias_env: None,
        doc: "schedule of the T+3/T+7 job (cron: minute hour day-of-month month day-of-week)",
    },
    Key {
        name: "freshplan.followup.timezone",
        default: "\"Europe/Berlin\"",
        alias_env: None,
        doc: "time zone of the schedule, the seasons and the sales day",
    },
    Key {
        name: "freshplan.followup.batch-size",
        default: "100",
        alias_env: None,
        doc: "leads claimed per transaction",
    },
    Key {
        name: "freshplan.followup.public-url",
        default: "\"http://127.0.0.1:8080\"",
        alias_env: None,
        doc: "public base URL of this service, for the unsubscribe link in mails",
    },
    Key {
        name: "freshplan.followup.unsubscribe-valid-days",
        default: "90",
        alias_env: None,
        doc: "how long an unsubscribe link works",
    },
    Key {
        name: "freshplan.mail.transport",
        default: "\"file\"",
        alias_env: None,
        doc: "file (one .eml per mail in freshplan.mail.file-dir) or smtp",
    },
    Key {
        name: "freshplan.mail.file-dir",
        default: "\"mail-out\"",
        alias_env: None,
        doc: "folder of the file transport",
    },
    Key {
        name: "freshplan.mail.from",
        default: "\"FreshFoodz Vertrieb <vertrieb@freshfoodz.example>\"",
        alias_env: None,
        doc: "sender of follow-up mails",
    },
    Key {
        name: "freshplan.mail.smtp.host",
        default: "\"127.0.0.1\"",
        alias_env: None,
        doc: "SMTP server",
    },
    Key {
        name: "freshplan.mail.smtp.port",
        default: "587",
        alias_env: None,
        doc: "SMTP port",
    },
    Key {
        name: "freshplan.mail.smtp.starttls",
        default: "\"required\"",
        alias_env: None,
        doc: "required, opportunistic or off",
    },
    Key {
        name: "freshplan.mail.smtp.username",
        default: "\"\"",
        alias_env: None,
        doc: "SMTP AUTH user (empty: no AUTH)",
    },
    Key {
        name: "freshplan.mail.smtp.password",
        default: "\"\"",
        alias_env: None,
        doc: "SMTP AUTH password",
    },
    Key {
        name: "freshplan.mail.timeout-seconds",
        default: "30",
        alias_env: None,
        doc: "one delivery attempt at most this long",
    },
    Key {
        name: "freshplan.mail.max-attempts",
        default: "5",
        alias_env: None,
        doc: "delivery attempts before a follow-up is marked failed",
    },
    Key {
        name: "freshplan.mail.backoff-ms",
        default: "30000",
        alias_env: None,
        doc: "wait before the first retry; doubled per attempt, at most one hour",
    },
    Key {
        name: "freshplan.relay.enabled",
        default: "false",
        alias_env: None,
        doc: "true: serve also runs the NATS JetStream relay (one active per database, others stand by)",
    },
    Key {
        name: "freshplan.relay.nats-url",
        default: "\"nats://127.0.0.1:4222\"",
        alias_env: None,
        doc: "NATS server(s) of the relay, comma-separated",
    },
    Key {
        name: "freshplan.relay.stream",
        default: "\"FRESHPLAN_LEADS\"",
        alias_env: None,
        doc: "JetStream stream the relay creates or updates at start (subjects freshplan.leads.>)",
    },
    Key {
        name: "freshplan.relay.max-age-hours",
        default: "168",
        alias_env: None,
        doc: "how long the stream keeps a message (limits retention)",
    },
    Key {
        name: "freshplan.relay.duplicate-window-seconds",
        default: "120",
        alias_env: None,
        doc: "JetStream dedupe window by Nats-Msg-Id; must exceed twice the ack timeout",
    },
    Key {
        name: "freshplan.relay.replicas",
        default: "1",
        alias_env: None,
        doc: "stream replicas (1 on a single server, 3 in a cluster)",
    },
    Key {
        name: "freshplan.relay.batch-size",
        default: "256",
        alias_env: None,
        doc: "outbox rows published per batch (publishes pipelined, then all acks awaited)",
    },
    Key {
        name: "freshplan.relay.ack-timeout-ms",
        default: "5000",
        alias_env: None,
        doc: "wait for a publish ack (and JetStream API answers) before the batch is retried",
    },
    Key {
        name: "freshplan.relay.poll-interval-ms",
        default: "100",
        alias_env: None,
        doc: "fallback poll of the outbox (a commit's doorbell ring wakes the relay at once), and how often a standby relay tries to take over",
    },
];

/// Errors that name the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("configuration file {path}: {message}")]
    File { path: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Feature toggles (CONTRACT.md "Configuration").
#[derive(Debug, Clone)]
pub struct Features {
    /// `features.dashboard.lead-widget.enabled`
    pub lead_widget: bool,
    /// `features.events.cross-module.enabled`
    pub cross_module_events: bool,
    /// `features.metrics.prometheus.enabled`
    pub prometheus: bool,
}

/// How tokens are verified.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub secret: String,
    pub public_key_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`; must be set with a public key or JWKS file.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Tokens whose `exp` lies further ahead than this are refused.
    pub max_lifetime_seconds: u64,
    /// Not a configuration key: the file of the random development secret of a data folder
    /// (`serve --demo` creates it, `token` reads it), used only when no key is configured and
    /// the caller allows the development secret.
    pub demo_secret_file: Option<PathBuf>,
}

/// Default of `freshplan.auth.jwt.max-lifetime-seconds` (12 h).
pub const DEFAULT_MAX_TOKEN_LIFETIME_SECONDS: u64 = 12 * 3600;

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            secret: String::new(),
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            max_lifetime_seconds: DEFAULT_MAX_TOKEN_LIFETIME_SECONDS,
            demo_secret_file: None,
        }
    }
}

/// Where PII keys come from (see `pii`). `Debug` shows which sources are set, never key material.
#[derive(Clone, Default)]
pub struct PiiSettings {
    pub key_file: Option<PathBuf>,
    pub keys: String,
    pub lookup_key: String,
}

impl std::fmt::Debug for PiiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self
            .keys
            .split(',')
            .filter_map(|k| k.split_once(':').map(|(id, _)| id.trim()))
            .collect();
        f.debug_struct("PiiSettings")
            .field("key_file", &self.key_file)
            .field("keys", &ids)
            .field(
                "lookup_key",
                &if self.lookup_key.is_empty() {
                    "unset"
                } else {
                    "set"
                },
            )
            .finish()
    }
}

/// Event path tuning.
#[derive(Debug, Clone)]
pub struct EventSettings {
    pub poll_interval_ms: u64,
    /// Hours; fractions allowed (`0.5`), so tests and small installations can shorten it.
    pub outbox_retention_hours: f64,
    /// Hours, ≥ the outbox's; inbox rows of events beyond a consumer's durable cursor stay.
    pub inbox_retention_hours: f64,
    /// Interval of the retention job.
    pub retention_interval_seconds: u64,
    /// Bound of the listener's memory of rows handled ahead of the durable cursor (while a long
    /// transaction holds the cursor back).
    pub max_unsettled_rows: usize,
    pub dedupe_cache_size: usize,
    pub sse_queue_size: usize,
    pub sse_keepalive_seconds: u64,
}

/// Follow-up job (`freshplan.followup.*`).
#[derive(Debug, Clone)]
pub struct FollowupSettings {
    pub enabled: bool,
    /// The schedule, as configured (5 fields).
    pub cron: String,
    pub timezone: chrono_tz::Tz,
    pub batch_size: i64,
    /// Base URL of the unsubscribe link, without a trailing slash.
    pub public_url: String,
    pub unsubscribe_valid_days: i64,
}

/// How mails leave (`freshplan.mail.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailTransport {
    File(PathBuf),
    Smtp(SmtpSettings),
}

/// STARTTLS policy of the SMTP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartTls {
    Required,
    Opportunistic,
    Off,
}

/// SMTP server. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub starttls: StartTls,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("starttls", &self.starttls)
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() {
                    "unset"
                } else {
                    "set"
                },
            )
            .finish()
    }
}

/// Mail delivery.
#[derive(Debug, Clone)]
pub struct MailSettings {
    pub transport: MailTransport,
    pub from: String,
    pub timeout_seconds: u64,
    pub max_attempts: i32,
    pub backoff_ms: u64,
}

/// The outbox → NATS JetStream relay (`freshplan.relay.*`, see `events::relay`).
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// `freshplan.relay.enabled`: run the relay inside `serve`.
    pub enabled: bool,
    pub nats_url: String,
    pub stream: String,
    pub max_age_hours: u64,
    pub duplicate_window_seconds: u64,
    pub replicas: usize,
    pub batch_size: i64,
    pub ack_timeout_ms: u64,
    pub poll_interval_ms: u64,
}

/// Validated settings of one instance.
#[derive(Debug, Clone)]
pub struct Settings {
    pub features: Features,
    pub allow_unauthenticated_publisher: bool,
    pub database_url: String,
    pub admin_database_url: String,
    pub owner_role: String,
    pub pool_size: u32,
    pub jwt: JwtSettings,
    /// `freshplan.auth.users.refresh-seconds`: TTL of cached user rows and interval of the
    /// open-stream check.
    pub users_refresh_seconds: u64,
    pub dev_login: bool,
    /// `freshplan.auth.cookie-secure`: `None` is `auto` (on unless [`Settings::demo`]).
    pub cookie_secure: Option<bool>,
    /// Not a configuration key: `serve --demo` sets it.
    pub demo: bool,
    pub pii: PiiSettings,
    pub events: EventSettings,
    /// `freshplan.cockpit.widget-max-staleness-ms`
    pub widget_max_staleness_ms: u64,
    /// `freshplan.stream.max-per-principal`
    pub stream_max_per_principal: usize,
    pub max_body_bytes: usize,
    /// `freshplan.http.max-connections`
    pub max_connections: usize,
    /// `freshplan.http.header-timeout-seconds`
    pub header_timeout_seconds: u64,
    pub followup: FollowupSettings,
    pub mail: MailSettings,
    pub relay: RelaySettings,
}

/// Environment variable that overrides a dotted key.
pub fn env_name(key: &str) -> String {
    key.to_ascii_uppercase().replace(['.', '-'], "_")
}

fn flatten(prefix: &str, value: &figment::value::Value, out: &mut Vec<String>) {
    if let figment::value::Value::Dict(_, dict) = value {
        for (k, v) in dict {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            flatten(&key, v, out);
        }
    } else {
        out.push(prefix.to_string());
    }
}

impl Settings {
    /// Loads defaults, then the optional file, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, |name| std::env::var(name).ok())
    }

    /// Same as [`Settings::load`] with an explicit environment (tests).
    pub fn load_with(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        for key in KEYS {
            let value: figment::value::Value = key
                .default
                .parse::<toml_value::Value>()
                .map(|v| v.0)
                .map_err(|m| invalid(key.name, m))?;
            figment = figment.merge(Serialized::default(key.name, value));
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let file_figment = Figment::from(Toml::string(&text));
            let data = file_figment.find_value("").map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let mut present = Vec::new();
            flatten("", &data, &mut present);
            for name in present {
                if !KEYS.iter().any(|k| k.name == name) {
                    return Err(invalid(&name, "unknown key (see README, Configuration)"));
                }
            }
            figment = figment.merge(Toml::string(&text));
        }
        for key in KEYS {
            let from_env = env(&env_name(key.name)).or_else(|| key.alias_env.and_then(&env));
            if let Some(v) = from_env {
                figment = figment.merge(Serialized::default(key.name, v));
            }
        }
        Self::from_figment(&figment)
    }

    fn from_figment(f: &Figment) -> Result<Self, ConfigError> {
        fn get<T: serde::de::DeserializeOwned>(f: &Figment, key: &str) -> Result<T, ConfigError> {
            f.extract_inner_lossy::<T>(key)
                .map_err(|e| invalid(key, e.to_string()))
        }
        fn path(f: &Figment, key: &str) -> Result<Option<PathBuf>, ConfigError> {
            let s: String = get(f, key)?;
            Ok((!s.is_empty()).then(|| PathBuf::from(s)))
        }
        let rls: bool = get(f, "freshplan.security.rls.enabled")?;
        if !rls {
            return Err(invalid(
                "freshplan.security.rls.enabled",
                "row-level security cannot be turned off; remove the key or set it to true",
            ));
        }
        let issuer: String = get(f, "freshplan.auth.jwt.issuer")?;
        let audience: String = get(f, "freshplan.auth.jwt.audience")?;
        let settings = Settings {
            features: Features {
                lead_widget: get(f, "features.dashboard.lead-widget.enabled")?,
                cross_module_events: get(f, "features.events.cross-module.enabled")?,
                prometheus: get(f, "features.metrics.prometheus.enabled")?,
            },
            allow_unauthenticated_publisher: get(
                f,
                "freshplan.security.allow-unauthenticated-publisher",
            )?,
            database_url: get(f, "freshplan.database.url")?,
            admin_database_url: get(f, "freshplan.database.admin-url")?,
            owner_role: get(f, "freshplan.database.owner-role")?,
            pool_size: get(f, "freshplan.database.pool-size")?,
            jwt: JwtSettings {
                secret: get(f, "freshplan.auth.jwt.secret")?,
                public_key_file: path(f, "freshplan.auth.jwt.public-key-file")?,
                jwks_file: path(f, "freshplan.auth.jwt.jwks-file")?,
                issuer: (!issuer.is_empty()).then_some(issuer),
                audience: (!audience.is_empty()).then_some(audience),
                max_lifetime_seconds: get(f, "freshplan.auth.jwt.max-lifetime-seconds")?,
                demo_secret_file: None,
            },
            users_refresh_seconds: get(f, "freshplan.auth.users.refresh-seconds")?,
            dev_login: get(f, "freshplan.auth.dev-login.enabled")?,
            cookie_secure: match get::<String>(f, "freshplan.auth.cookie-secure")?.as_str() {
                "auto" => None,
                "true" => Some(true),
                "false" => Some(false),
                other => {
                    return Err(invalid(
                        "freshplan.auth.cookie-secure",
                        format!("`{other}`: expected auto, true or false"),
                    ))
                }
            },
            demo: false,
            pii: PiiSettings {
                key_file: path(f, "freshplan.pii.key-file")?,
                keys: get(f, "freshplan.pii.keys")?,
                lookup_key: get(f, "freshplan.pii.lookup-key")?,
            },
            events: EventSettings {
                poll_interval_ms: get(f, "freshplan.events.poll-interval-ms")?,
                outbox_retention_hours: get(f, "freshplan.events.outbox-retention-hours")?,
                inbox_retention_hours: get(f, "freshplan.events.inbox-retention-hours")?,
                retention_interval_seconds: get(f, "freshplan.events.retention-interval-seconds")?,
                max_unsettled_rows: get(f, "freshplan.events.max-unsettled-rows")?,
                dedupe_cache_size: get(f, "freshplan.events.dedupe-cache-size")?,
                sse_queue_size: get(f, "freshplan.events.sse-queue-size")?,
                sse_keepalive_seconds: get(f, "freshplan.events.sse-keepalive-seconds")?,
            },
            widget_max_staleness_ms: get(f, "freshplan.cockpit.widget-max-staleness-ms")?,
            stream_max_per_principal: get(f, "freshplan.stream.max-per-principal")?,
            max_body_bytes: get(f, "freshplan.http.max-body-bytes")?,
            max_connections: get(f, "freshplan.http.max-connections")?,
            header_timeout_seconds: get(f, "freshplan.http.header-timeout-seconds")?,
            followup: FollowupSettings {
                enabled: get(f, "freshplan.followup.enabled")?,
                cron: get(f, "freshplan.followup.cron")?,
                timezone: {
                    let name: String = get(f, "freshplan.followup.timezone")?;
                    name.parse().map_err(|_| {
                        invalid(
                            "freshplan.followup.timezone",
                            format!(
                                "unknown time zone `{name}` (an IANA name such as Europe/Berlin)"
                            ),
                        )
                    })?
                },
                batch_size: get(f, "freshplan.followup.batch-size")?,
                public_url: get::<String>(f, "freshplan.followup.public-url")?
                    .trim_end_matches('/')
                    .to_string(),
                unsubscribe_valid_days: get(f, "freshplan.followup.unsubscribe-valid-days")?,
            },
            mail: MailSettings {
                transport: {
                    let kind: String = get(f, "freshplan.mail.transport")?;
                    match kind.as_str() {
                        "file" => MailTransport::File(PathBuf::from(get::<String>(
                            f,
                            "freshplan.mail.file-dir",
                        )?)),
                        "smtp" => MailTransport::Smtp(SmtpSettings {
                            host: get(f, "freshplan.mail.smtp.host")?,
                            port: get(f, "freshplan.mail.smtp.port")?,
                            starttls: match get::<String>(f, "freshplan.mail.smtp.starttls")?
                                .as_str()
                            {
                                "required" => StartTls::Required,
                                "opportunistic" => StartTls::Opportunistic,
                                "off" => StartTls::Off,
                                other => {
                                    return Err(invalid(
                                        "freshplan.mail.smtp.starttls",
                                        format!(
                                            "`{other}`: expected required, opportunistic or off"
                                        ),
                                    ))
                                }
                            },
                            username: get(f, "freshplan.mail.smtp.username")?,
                            password: get(f, "freshplan.mail.smtp.password")?,
                        }),
                        other => {
                            return Err(invalid(
                                "freshplan.mail.transport",
                                format!("`{other}`: expected file or smtp"),
                            ))
                        }
                    }
                },
                from: get(f, "freshplan.mail.from")?,
                timeout_seconds: get(f, "freshplan.mail.timeout-seconds")?,
                max_attempts: get(f, "freshplan.mail.max-attempts")?,
                backoff_ms: get(f, "freshplan.mail.backoff-ms")?,
            },
            relay: RelaySettings {
                enabled: get(f, "freshplan.relay.enabled")?,
                nats_url: get(f, "freshplan.relay.nats-url")?,
                stream: get(f, "freshplan.relay.stream")?,
                max_age_hours: get(f, "freshplan.relay.max-age-hours")?,
                duplicate_window_seconds: get(f, "freshplan.relay.duplicate-window-seconds")?,
                replicas: get(f, "freshplan.relay.replicas")?,
                batch_size: get(f, "freshplan.relay.batch-size")?,
                ack_timeout_ms: get(f, "freshplan.relay.ack-timeout-ms")?,
                poll_interval_ms: get(f, "freshplan.relay.poll-interval-ms")?,
            },
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate_relay(&self) -> Result<(), ConfigError> {
        let r = &self.relay;
        let stream_ok = !r.stream.is_empty()
            && r.stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !stream_ok {
            return Err(invalid(
                "freshplan.relay.stream",
                "must be a non-empty name of letters, digits, `_` or `-` (no dots or spaces)",
            ));
        }
        if r.nats_url.trim().is_empty() {
            return Err(invalid("freshplan.relay.nats-url", "must not be empty"));
        }
        if !(1..=5).contains(&r.replicas) {
            return Err(invalid(
                "freshplan.relay.replicas",
                "must be between 1 and 5",
            ));
        }
        if !(1..=10_000).contains(&r.batch_size) {
            return Err(invalid(
                "freshplan.relay.batch-size",
                "must be between 1 and 10000",
            ));
        }
        if r.ack_timeout_ms < 100 {
            return Err(invalid(
                "freshplan.relay.ack-timeout-ms",
                "must be at least 100",
            ));
        }
        if r.poll_interval_ms < 10 {
            return Err(invalid(
                "freshplan.relay.poll-interval-ms",
                "must be at least 10",
            ));
        }
        if r.max_age_hours < 1 {
            return Err(invalid(
                "freshplan.relay.max-age-hours",
                "must be at least 1",
            ));
        }
        // A batch is republished after a crash at most one ack timeout (plus a commit) after it
        // was first sent; JetStream must still remember its ids then.
        if r.duplicate_window_seconds.saturating_mul(1000) < r.ack_timeout_ms.saturating_mul(2) {
            return Err(invalid(
                "freshplan.relay.duplicate-window-seconds",
                "must cover at least twice freshplan.relay.ack-timeout-ms (see docs/relay.md)",
            ));
        }
        if r.duplicate_window_seconds > r.max_age_hours.saturating_mul(3600) {
            return Err(invalid(
                "freshplan.relay.duplicate-window-seconds",
                "must not exceed freshplan.relay.max-age-hours (JetStream refuses it)",
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=512).contains(&self.pool_size) {
            return Err(invalid(
                "freshplan.database.pool-size",
                "must be between 1 and 512",
            ));
        }
        self.validate_relay()?;
        if self.events.poll_interval_ms < 10 {
            return Err(invalid(
                "freshplan.events.poll-interval-ms",
                "must be at least 10",
            ));
        }
        // At least one second; fractions of an hour are allowed.
        if !(self.events.outbox_retention_hours.is_finite()
            && self.events.outbox_retention_hours >= 1.0 / 3600.0)
        {
            return Err(invalid(
                "freshplan.events.outbox-retention-hours",
                "must be a number of hours of at least 1 second (0.0003), e.g. 168 or 0.5",
            ));
        }
        if !self.events.inbox_retention_hours.is_finite() {
            return Err(invalid(
                "freshplan.events.inbox-retention-hours",
                "must be a number of hours",
            ));
        }
        if self.events.inbox_retention_hours < self.events.outbox_retention_hours {
            return Err(invalid(
                "freshplan.events.inbox-retention-hours",
                "must be at least freshplan.events.outbox-retention-hours (a re-read event must still find its inbox row)",
            ));
        }
        if !(1..=86_400).contains(&self.events.retention_interval_seconds) {
            return Err(invalid(
                "freshplan.events.retention-interval-seconds",
                "must be between 1 and 86400",
            ));
        }
        if self.events.max_unsettled_rows < 100 {
            return Err(invalid(
                "freshplan.events.max-unsettled-rows",
                "must be at least 100",
            ));
        }
        if self.events.sse_queue_size < 1 {
            return Err(invalid(
                "freshplan.events.sse-queue-size",
                "must be at least 1",
            ));
        }
        if self.events.dedupe_cache_size < 1 {
            return Err(invalid(
                "freshplan.events.dedupe-cache-size",
                "must be at least 1",
            ));
        }
        if !self.jwt.secret.is_empty() && self.jwt.secret.len() < 32 {
            return Err(invalid(
                "freshplan.auth.jwt.secret",
                "must be at least 32 bytes long",
            ));
        }
        if (self.jwt.public_key_file.is_some() || self.jwt.jwks_file.is_some())
            && self.jwt.issuer.is_none()
        {
            return Err(invalid(
                "freshplan.auth.jwt.issuer",
                "is required with freshplan.auth.jwt.public-key-file or freshplan.auth.jwt.jwks-file \
                 (the identity provider's issuer URL)",
            ));
        }
        if !(60..=7 * 24 * 3600).contains(&self.jwt.max_lifetime_seconds) {
            return Err(invalid(
                "freshplan.auth.jwt.max-lifetime-seconds",
                "must be between 60 and 604800",
            ));
        }
        if !(1..=300).contains(&self.users_refresh_seconds) {
            return Err(invalid(
                "freshplan.auth.users.refresh-seconds",
                "must be between 1 and 300",
            ));
        }
        if self.widget_max_staleness_ms > 60_000 {
            return Err(invalid(
                "freshplan.cockpit.widget-max-staleness-ms",
                "must be between 0 and 60000",
            ));
        }
        if !(1..=100).contains(&self.stream_max_per_principal) {
            return Err(invalid(
                "freshplan.stream.max-per-principal",
                "must be between 1 and 100",
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid(
                "freshplan.http.max-body-bytes",
                "must be at least 1024",
            ));
        }
        if !(1..=65_536).contains(&self.max_connections) {
            return Err(invalid(
                "freshplan.http.max-connections",
                "must be between 1 and 65536",
            ));
        }
        if !(1..=600).contains(&self.header_timeout_seconds) {
            return Err(invalid(
                "freshplan.http.header-timeout-seconds",
                "must be between 1 and 600",
            ));
        }
        if let Err(e) =
            crate::schedule::Schedule::parse(&self.followup.cron, self.followup.timezone)
        {
            return Err(invalid("freshplan.followup.cron", e));
        }
        if !(1..=10_000).contains(&self.followup.batch_size) {
            return Err(invalid(
                "freshplan.followup.batch-size",
                "must be between 1 and 10000",
            ));
        }
        if !(self.followup.public_url.starts_with("http://")
            || self.followup.public_url.starts_with("https://"))
        {
            return Err(invalid(
                "freshplan.followup.public-url",
                "must be an http:// or https:// URL",
            ));
        }
        if !(1..=3650).contains(&self.followup.unsubscribe_valid_days) {
            return Err(invalid(
                "freshplan.followup.unsubscribe-valid-days",
                "must be between 1 and 3650",
            ));
        }
        if self.mail.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(invalid(
                "freshplan.mail.from",
                "must be a mailbox such as `FreshFoodz Vertrieb <vertrieb@example.com>`",
            ));
        }
        if !(1..=20).contains(&self.mail.max_attempts) {
            return Err(invalid(
                "freshplan.mail.max-attempts",
                "must be between 1 and 20",
            ));
        }
        if !(1..=3_600_000).contains(&self.mail.backoff_ms) {
            return Err(invalid(
                "freshplan.mail.backoff-ms",
                "must be between 1 and 3600000",
            ));
        }
        if !(1..=600).contains(&self.mail.timeout_seconds) {
            return Err(invalid(
                "freshplan.mail.timeout-seconds",
                "must be between 1 and 600",
            ));
        }
        if let MailTransport::Smtp(smtp) = &self.mail.transport {
            if smtp.host.is_empty() {
                return Err(invalid("freshplan.mail.smtp.host", "must not be empty"));
            }
            if smtp.username.is_empty() != smtp.password.is_empty() {
                return Err(invalid(
                    "freshplan.mail.smtp.password",
                    "freshplan.mail.smtp.username and password are set together or not at all",
                ));
            }
        }
        for (key, url) in [
            ("freshplan.database.url", &self.database_url),
            ("freshplan.database.admin-url", &self.admin_database_url),
        ] {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(invalid(key, "must be a postgres:// URL"));
            }
        }
        Ok(())
    }

    /// Refuses, for `freshplan serve` without `--demo`, the switches that only tests and the demo
    /// may use: `freshplan.auth.dev-login.enabled` (anyone could pick any user) and
    /// `freshplan.security.allow-unauthenticated-publisher` (anyone could write). Tests build
    /// the application through the library and never pass through here.
    pub fn refuse_development_switches(&self) -> Result<(), ConfigError> {
        if self.dev_login {
            return Err(invalid(
                "freshplan.auth.dev-login.enabled",
                "the development login lets anyone act as any user: it is only available with \
                 `serve --demo`; remove the key",
            ));
        }
        if self.allow_unauthenticated_publisher {
            return Err(invalid(
                "freshplan.security.allow-unauthenticated-publisher",
                "lets anonymous requests write: only for tests and `serve --demo`; remove the key",
            ));
        }
        Ok(())
    }

    /// Whether the session cookie carries `Secure`: as configured, else on outside `--demo`
    /// (which serves plain HTTP on loopback).
    pub fn secure_cookies(&self) -> bool {
        self.cookie_secure.unwrap_or(!self.demo)
    }

    /// The documented keys with their defaults and meaning (README, `--help`).
    pub fn documented_keys() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
        KEYS.iter().map(|k| (k.name, k.default, k.doc))
    }
}

/// Parses a TOML scalar written as text (the defaults table above).
mod toml_value {
    pub struct Value(pub figment::value::Value);

    impl std::str::FromStr for Value {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, Self::Err> {
            let doc = format!("v = {s}");
            let figment = figment::Figment::from(
                <figment::providers::Toml as figment::providers::Format>::string(&doc),
            );
            figment
                .find_value("v")
                .map(Value)
                .map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("freshplan.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
        }
        Settings::load_with(file.map(|_| path.as_path()), |k| env.get(k).cloned())
    }

    #[test]
    fn the_readme_documents_every_key() {
        let readme = include_str!("../README.md");
        for (name, _, doc) in Settings::documented_keys() {
            assert!(!doc.is_empty());
            assert!(
                readme.contains(&format!("`{name}`")),
                "README lacks `{name}`"
            );
        }
    }

    #[test]
    fn defaults_enable_every_feature() {
        let s = load(None, &[]).unwrap();
        assert!(s.features.lead_widget && s.features.cross_module_events && s.features.prometheus);
        assert!(!s.allow_unauthenticated_publisher);
        assert!(s.database_url.contains("freshplan_app"));
    }

    #[test]
    fn dotted_keys_from_the_file_and_env_override_them() {
        let s = load(
            Some("features.dashboard.lead-widget.enabled = false\nfeatures.events.cross-module.enabled = false\n"),
            &[("FEATURES_EVENTS_CROSS_MODULE_ENABLED", "true"), ("DATABASE_URL", "postgres://x@h/db")],
        )
        .unwrap();
        assert!(!s.features.lead_widget);
        assert!(s.features.cross_module_events);
        assert_eq!(s.database_url, "postgres://x@h/db");
    }

    #[test]
    fn turning_rls_off_is_refused_naming_the_key() {
        let err = load(Some("freshplan.security.rls.enabled = false"), &[]).unwrap_err();
        assert!(
            err.to_string().contains("freshplan.security.rls.enabled"),
            "{err}"
        );
        let err = load(None, &[("FRESHPLAN_SECURITY_RLS_ENABLED", "false")]).unwrap_err();
        assert!(err.to_string().contains("cannot be turned off"), "{err}");
    }

    #[test]
    fn debug_output_of_the_settings_shows_no_key_material() {
        let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        let lookup = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";
        let s = load(
            None,
            &[
                ("FRESHPLAN_PII_KEYS", &format!("k1:{key}")),
                ("FRESHPLAN_PII_LOOKUP_KEY", lookup),
            ],
        )
        .unwrap();
        let shown = format!("{s:?}");
        assert!(shown.contains("\"k1\""), "{shown}");
        assert!(!shown.contains(key) && !shown.contains(lookup), "{shown}");
    }

    #[test]
    fn identity_keys_are_read_and_checked() {
        let s = load(None, &[]).unwrap();
        assert_eq!(s.jwt.audience, None);
        assert_eq!(
            s.jwt.max_lifetime_seconds,
            DEFAULT_MAX_TOKEN_LIFETIME_SECONDS
        );
        assert_eq!(
            (s.users_refresh_seconds, s.stream_max_per_principal),
            (5, 5)
        );
        assert!(s.refuse_development_switches().is_ok());
        let s = load(
            Some("freshplan.auth.jwt.audience = \"fp\"\nfreshplan.stream.max-per-principal = 2\n"),
            &[("FRESHPLAN_AUTH_DEV_LOGIN_ENABLED", "true")],
        )
        .unwrap();
        assert_eq!(s.jwt.audience.as_deref(), Some("fp"));
        assert_eq!(s.stream_max_per_principal, 2);
        let err = s.refuse_development_switches().unwrap_err();
        assert!(err.to_string().contains("dev-login"), "{err}");
        let s = load(
            None,
            &[("FRESHPLAN_SECURITY_ALLOW_UNAUTHENTICATED_PUBLISHER", "true")],
        )
        .unwrap();
        let err = s.refuse_development_switches().unwrap_err();
        assert!(
            err.to_string().contains("allow-unauthenticated-publisher"),
            "{err}"
        );
        for (key, value, named) in [
            (
                "FRESHPLAN_AUTH_JWT_JWKS_FILE",
                "/x.json",
                "freshplan.auth.jwt.issuer",
            ),
            (
                "FRESHPLAN_AUTH_JWT_MAX_LIFETIME_SECONDS",
                "0",
                "max-lifetime-seconds",
            ),
            (
                "FRESHPLAN_AUTH_USERS_REFRESH_SECONDS",
                "0",
                "refresh-seconds",
            ),
            (
                "FRESHPLAN_STREAM_MAX_PER_PRINCIPAL",
                "0",
                "max-per-principal",
            ),
        ] {
            let err = load(None, &[(key, value)]).unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
        }
    }

    #[test]
    fn unknown_and_malformed_keys_are_named() {
        let err = load(Some("features.dashboard.lead-widgit.enabled = true"), &[]).unwrap_err();
        assert!(err.to_string().contains("lead-widgit"), "{err}");
        let err = load(None, &[("FRESHPLAN_DATABASE_POOL_SIZE", "many")]).unwrap_err();
        assert!(
            err.to_string().contains("freshplan.database.pool-size"),
            "{err}"
        );
        let err = load(
            None,
            &[
                ("FRESHPLAN_EVENTS_INBOX_RETENTION_HOURS", "1"),
                ("FRESHPLAN_EVENTS_OUTBOX_RETENTION_HOURS", "2"),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("inbox-retention-hours"), "{err}");
    }

    #[test]
    fn retention_takes_fractions_of_an_hour_down_to_a_second_and_its_interval_and_the_listener_bound_are_checked(
    ) {
        let s = load(
            None,
            &[
                ("FRESHPLAN_EVENTS_OUTBOX_RETENTION_HOURS", "0.5"),
                ("FRESHPLAN_EVENTS_INBOX_RETENTION_HOURS", "0.75"),
                ("FRESHPLAN_EVENTS_RETENTION_INTERVAL_SECONDS", "60"),
                ("FRESHPLAN_EVENTS_MAX_UNSETTLED_ROWS", "500"),
            ],
        )
        .unwrap();
        assert_eq!(s.events.outbox_retention_hours, 0.5);
        assert_eq!(s.events.inbox_retention_hours, 0.75);
        assert_eq!(s.events.retention_interval_seconds, 60);
        assert_eq!(s.events.max_unsettled_rows, 500);
        let defaults = load(None, &[]).unwrap();
        assert_eq!(defaults.events.outbox_retention_hours, 168.0);
        assert_eq!(defaults.events.retention_interval_seconds, 3600);
        assert_eq!(defaults.events.max_unsettled_rows, 100_000);
        for (key, value, named) in [
            (
                "FRESHPLAN_EVENTS_OUTBOX_RETENTION_HOURS",
                "0.0001",
                "outbox-retention-hours",
            ),
            (
                "FRESHPLAN_EVENTS_OUTBOX_RETENTION_HOURS",
                "NaN",
                "outbox-retention-hours",
            ),
            (
                "FRESHPLAN_EVENTS_RETENTION_INTERVAL_SECONDS",
                "0",
                "retention-interval-seconds",
            ),
            (
                "FRESHPLAN_EVENTS_RETENTION_INTERVAL_SECONDS",
                "90000",
                "retention-interval-seconds",
            ),
            (
                "FRESHPLAN_EVENTS_MAX_UNSETTLED_ROWS",
                "99",
                "max-unsettled-rows",
            ),
        ] {
            let err = load(None, &[(key, value)]).unwrap_err();
            assert!(err.to_string().contains(named), "{key}={value}: {err}");
        }
    }

    #[test]
    fn the_relay_is_off_by_default_and_its_dedupe_window_must_cover_a_republish() {
        let s = load(None, &[]).unwrap();
        assert!(!s.relay.enabled);
        assert_eq!(s.relay.stream, "FRESHPLAN_LEADS");
        let err = load(
            None,
            &[
                ("FRESHPLAN_RELAY_DUPLICATE_WINDOW_SECONDS", "5"),
                ("FRESHPLAN_RELAY_ACK_TIMEOUT_MS", "5000"),
            ],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("duplicate-window-seconds"),
            "{err}"
        );
        let err = load(None, &[("FRESHPLAN_RELAY_STREAM", "freshplan.leads")]).unwrap_err();
        assert!(err.to_string().contains("freshplan.relay.stream"), "{err}");
    }
}
