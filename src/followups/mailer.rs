//! Delivery: composes a follow-up mail (RFC 5322, text and HTML), and the dispatcher that drains
//! the mail outbox through a transport (`file`: one .eml per mail; `smtp`) with retries and
//! exponential backoff. A follow-up becomes SENT only when its mail was delivered, FAILED only
//! after the last attempt; either outcome is one transaction with its per-lead
//! `dashboard.followup_completed` event and an audit row.
//!
//! Delivery is at least once: a dispatcher that dies after the server accepted a mail and before
//! it recorded that sends it again when the claim expires. The Message-ID is the mail's id, so a
//! receiving system can recognise the repeat.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use super::clock::Clock;
use super::repo::{self, ClaimedMail, LeadAudience};
use super::templates::{Kind, RenderedMail};
use crate::config::{MailSettings, MailTransport, SmtpSettings, StartTls};
use crate::db;
use crate::error::{ApiError, ApiResult};
use crate::events::envelope::{self, Audience, EventType, NewEvent};
use crate::events::Publisher;
use crate::identity::Principal;
use crate::leads::repo as leads_repo;
use crate::pii::{PiiField, Vault};
use crate::telemetry::metrics::Metrics;

/// Mails taken per delivery round.
const ROUND: i64 = 20;
/// Longest wait between retries.
const MAX_BACKOFF_MS: u64 = 3_600_000;

/// What the mail outbox stores, sealed: the recipient and the formatted message.
#[derive(Serialize, Deserialize)]
struct Sealed {
    to: String,
    raw: String,
}

/// A composed mail.
pub struct Composed {
    pub to: String,
    pub raw: Vec<u8>,
}

/// Builds the RFC 5322 message of `mail` to `to` (multipart/alternative, UTF-8), with the mail id
/// as Message-ID and a `List-Unsubscribe` header.
pub fn compose(
    from: &str,
    to: &str,
    mail_id: Uuid,
    rendered: &RenderedMail,
    unsubscribe_url: &str,
    date: DateTime<Utc>,
) -> Result<Composed, String> {
    let from: Mailbox = from
        .parse()
        .map_err(|_| "freshplan.mail.from is not a mailbox".to_string())?;
    let to_box: Mailbox = to
        .parse()
        .map_err(|_| "the lead's e-mail address is not a deliverable address".to_string())?;
    let domain = from.email.domain().to_string();
    let message = Message::builder()
        .from(from)
        .to(to_box)
        .subject(rendered.subject.clone())
        .date(date.into())
        .message_id(Some(format!("<{mail_id}@{domain}>")))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("List-Unsubscribe"),
            format!("<{unsubscribe_url}>"),
        ))
        .multipart(MultiPart::alternative_plain_html(
            rendered.text.clone(),
            rendered.html.clone(),
        ))
        .map_err(|e| format!("the mail could not be composed: {e}"))?;
    Ok(Composed {
        to: to.to_string(),
        raw: message.formatted(),
    })
}

/// Seals a composed mail for the outbox (it holds the recipient and the salutation).
pub fn seal(vault: &Vault, lead: Uuid, c: &Composed) -> Vec<u8> {
    let json = serde_json::to_string(&Sealed {
        to: c.to.clone(),
        raw: String::from_utf8_lossy(&c.raw).into_owned(),
    })
    .expect("serialising two strings cannot fail");
    vault.seal(lead, PiiField::Mail, &json)
}

/// Why an attempt failed, without PII (an SMTP server's reply text may quote the address, so
/// only its code is kept).
#[derive(Debug, Clone)]
pub struct DeliveryError(pub String);

/// Where mails go.
pub enum Transport {
    File(PathBuf),
    Smtp {
        transport: Box<AsyncSmtpTransport<Tokio1Executor>>,
        from: Mailbox,
    },
}

impl Transport {
    /// The configured transport.
    pub fn from_settings(s: &MailSettings) -> anyhow::Result<Self> {
        let from: Mailbox = s
            .from
            .parse()
            .map_err(|_| anyhow::anyhow!("freshplan.mail.from is not a mailbox"))?;
        Ok(match &s.transport {
            MailTransport::File(dir) => Transport::File(dir.clone()),
            MailTransport::Smtp(smtp) => Transport::Smtp {
                transport: Box::new(smtp_transport(
                    smtp,
                    Duration::from_secs(s.timeout_seconds),
                )?),
                from,
            },
        })
    }

    /// Delivers one mail.
    pub async fn deliver(&self, id: Uuid, to: &str, raw: &[u8]) -> Result<(), DeliveryError> {
        match self {
            Transport::File(dir) => {
                let write = async {
                    tokio::fs::create_dir_all(dir).await?;
                    let tmp = dir.join(format!(".{id}.eml.tmp"));
                    tokio::fs::write(&tmp, raw).await?;
                    tokio::fs::rename(&tmp, dir.join(format!("{id}.eml"))).await
                };
                write
                    .await
                    .map_err(|e| DeliveryError(format!("file transport: {}", e.kind())))
            }
            Transport::Smtp { transport, from } => {
                let to = to
                    .parse()
                    .map_err(|_| DeliveryError("recipient address is not valid".into()))?;
                let envelope = lettre::address::Envelope::new(Some(from.email.clone()), vec![to])
                    .map_err(|_| DeliveryError("envelope could not be built".into()))?;
                transport
                    .send_raw(&envelope, raw)
                    .await
                    .map(|_| ())
                    .map_err(|e| DeliveryError(smtp_error(&e)))
            }
        }
    }
}

fn smtp_transport(
    s: &SmtpSettings,
    timeout: Duration,
) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let tls = match s.starttls {
        StartTls::Off => Tls::None,
        StartTls::Opportunistic => Tls::Opportunistic(TlsParameters::new(s.host.clone())?),
        StartTls::Required => Tls::Required(TlsParameters::new(s.host.clone())?),
    };
    let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(s.host.clone())
        .port(s.port)
        .tls(tls)
        .timeout(Some(timeout));
    if !s.username.is_empty() {
        b = b.credentials(Credentials::new(s.username.clone(), s.password.clone()));
    }
    Ok(b.build())
}

fn smtp_error(e: &lettre::transport::smtp::Error) -> String {
    let code = e.status().map(|c| c.to_string());
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_tls() {
        "tls"
    } else if e.is_permanent() {
        "permanent"
    } else if e.is_transient() {
        "transient"
    } else if e.is_response() {
        "bad response"
    } else {
        "connection"
    };
    match code {
        Some(c) => format!("smtp {kind} {c}"),
        None => format!("smtp {kind}"),
    }
}

/// What one delivery round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Round {
    pub sent: i64,
    pub failed: i64,
    pub retrying: i64,
}

/// Drains the mail outbox.
pub struct Dispatcher {
    pub pool: PgPool,
    pub vault: Arc<Vault>,
    pub publisher: Publisher,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<Clock>,
    pub transport: Transport,
    pub settings: MailSettings,
    /// Rung when mails were queued.
    pub wake: Arc<Notify>,
}

impl Dispatcher {
    fn backoff_ms(&self, attempts: i32) -> u64 {
        let doublings = (attempts.max(1) - 1).min(20) as u32;
        self.settings
            .backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(MAX_BACKOFF_MS)
    }

    /// One round: takes the due mails and attempts each once.
    pub async fn round(&self) -> ApiResult<Round> {
        let system = Principal::system();
        let claim_seconds = (self.settings.timeout_seconds * 2 + 30) as i64;
        let mut tx = db::begin_as(&self.pool, &system).await?;
        let mails = repo::claim_mails(&mut tx, ROUND, claim_seconds).await?;
        tx.commit().await?;
        self.refresh_queue_gauge().await;
        let mut round = Round::default();
        for mail in mails {
            match self.attempt(&mail).await {
                Ok(Attempt::Sent) => round.sent += 1,
                Ok(Attempt::Failed) => round.failed += 1,
                Ok(Attempt::Retrying) => round.retrying += 1,
                Ok(Attempt::Lost) => {}
                Err(e) => {
                    tracing::warn!(mail_id = %mail.id, error = %e, "recording a delivery outcome failed; the mail is taken up again when its claim expires")
                }
            }
        }
        self.refresh_queue_gauge().await;
        Ok(round)
    }

    async fn attempt(&self, mail: &ClaimedMail) -> ApiResult<Attempt> {
        let kind = Kind::parse(&mail.followup_type).unwrap_or(Kind::T3);
        if !mail.mailable {
            return self.cancel(mail, kind).await;
        }
        let outcome =
            match self
                .vault
                .open(mail.lead_id, PiiField::Mail, &mail.key_id, &mail.message)
            {
                Ok(json) => match serde_json::from_str::<Sealed>(&json) {
                    Ok(sealed) => {
                        let timeout = Duration::from_secs(self.settings.timeout_seconds);
                        match tokio::time::timeout(
                            timeout,
                            self.transport
                                .deliver(mail.id, &sealed.to, sealed.raw.as_bytes()),
                        )
                        .await
                        {
                            Ok(r) => r,
                            Err(_) => Err(DeliveryError("timeout".into())),
                        }
                    }
                    Err(_) => Err(DeliveryError("stored mail unreadable".into())),
                },
                Err(_) => Err(DeliveryError("stored mail cannot be decrypted".into())),
            };
        let at = envelope::micros(self.clock.now());
        let system = Principal::system();
        let mut tx = db::begin_as(&self.pool, &system).await?;
        let (audience, success, error) = match outcome {
            Ok(()) => match repo::mark_sent(&mut tx, mail, kind, at).await? {
                Some(a) => (a, true, None),
                None => return Ok(Attempt::Lost),
            },
            Err(DeliveryError(error)) if mail.attempts < self.settings.max_attempts => {
                let wait = self.backoff_ms(mail.attempts);
                let mine = repo::reschedule(&mut tx, mail, &error, wait).await?;
                tx.commit().await?;
                if mine {
                    tracing::info!(mail_id = %mail.id, lead_id = %mail.lead_id, followup_type = kind.as_str(), attempt = mail.attempts, error = %error, retry_in_ms = wait, "follow-up mail not delivered; retrying");
                    return Ok(Attempt::Retrying);
                }
                return Ok(Attempt::Lost);
            }
            Err(DeliveryError(error)) => {
                match repo::mark_failed(&mut tx, mail, &error, at).await? {
                    Some(a) => (a, false, Some(error)),
                    None => return Ok(Attempt::Lost),
                }
            }
        };
        leads_repo::audit(
            &mut tx,
            &system,
            if success { "FOLLOWUP_SENT" } else { "FOLLOWUP_FAILED" },
            &mail.lead_id.to_string(),
            Some(audience.territory),
            json!({"followUpType": kind.as_str(), "mailId": mail.id, "attempts": mail.attempts, "error": error}),
        )
        .await?;
        let event = completed_event(mail.lead_id, kind, success, &audience, at);
        self.publisher.commit(tx, &[event]).await?;
        self.metrics
            .followup_sent
            .with_label_values(&[
                kind.as_str(),
                audience.territory.code(),
                if success { "success" } else { "failure" },
            ])
            .inc();
        match &error {
            None => {
                tracing::info!(mail_id = %mail.id, lead_id = %mail.lead_id, followup_type = kind.as_str(), territory = %audience.territory, attempts = mail.attempts, "follow-up mail delivered")
            }
            Some(e) => {
                tracing::warn!(mail_id = %mail.id, lead_id = %mail.lead_id, followup_type = kind.as_str(), territory = %audience.territory, attempts = mail.attempts, error = %e, "follow-up mail failed after the last attempt")
            }
        }
        Ok(if success {
            Attempt::Sent
        } else {
            Attempt::Failed
        })
    }

    /// The lead may no longer be mailed (consent withdrawn, contact blocked, clock stopped, no
    /// longer ACTIVE since the mail was queued): the follow-up ends FAILED (`cancelled: …`)
    /// without an attempt. Not a delivery failure, so not counted in `leads_followup_sent_total`.
    async fn cancel(&self, mail: &ClaimedMail, kind: Kind) -> ApiResult<Attempt> {
        let at = envelope::micros(self.clock.now());
        let system = Principal::system();
        let mut tx = db::begin_as(&self.pool, &system).await?;
        let error = "cancelled: lead no longer to be mailed";
        let Some(audience) = repo::mark_failed(&mut tx, mail, error, at).await? else {
            return Ok(Attempt::Lost);
        };
        leads_repo::audit(
            &mut tx,
            &system,
            "FOLLOWUP_CANCELLED",
            &mail.lead_id.to_string(),
            Some(audience.territory),
            json!({"followUpType": kind.as_str(), "mailId": mail.id}),
        )
        .await?;
        let event = completed_event(mail.lead_id, kind, false, &audience, at);
        self.publisher.commit(tx, &[event]).await?;
        tracing::info!(mail_id = %mail.id, lead_id = %mail.lead_id, followup_type = kind.as_str(), "follow-up mail cancelled: the lead may no longer be mailed");
        Ok(Attempt::Failed)
    }

    async fn refresh_queue_gauge(&self) {
        let sizes = async {
            let mut tx = db::begin_as(&self.pool, &Principal::system()).await?;
            let s = repo::queue_sizes(&mut tx).await?;
            tx.commit().await?;
            Ok::<_, ApiError>(s)
        }
        .await;
        if let Ok((pending, processing)) = sizes {
            self.metrics
                .followup_queue
                .with_label_values(&["pending"])
                .set(pending);
            self.metrics
                .followup_queue
                .with_label_values(&["processing"])
                .set(processing);
        }
    }

    /// Seconds until the next mail is due, if any, and how many are being delivered.
    async fn next_due(&self) -> ApiResult<(Option<f64>, i64)> {
        let mut tx = db::begin_as(&self.pool, &Principal::system()).await?;
        let next = repo::next_due_in(&mut tx).await?;
        tx.commit().await?;
        Ok(next)
    }

    /// Delivers until nothing is queued any more (every mail sent or failed), waiting out the
    /// backoff; gives up at `deadline` (real time). For `freshplan followups run` and tests.
    pub async fn drain(&self, deadline: Duration) -> ApiResult<Round> {
        let until = tokio::time::Instant::now() + deadline;
        let mut total = Round::default();
        loop {
            let r = self.round().await?;
            total.sent += r.sent;
            total.failed += r.failed;
            let wait = match self.next_due().await? {
                (None, 0) => return Ok(total),
                // Another dispatcher (the service's) is delivering: look again shortly.
                (None, _) => Some(0.02),
                (Some(s), _) => Some(s),
            };
            match wait {
                None => return Ok(total),
                Some(wait) => {
                    let wait = Duration::from_secs_f64(wait.max(0.005));
                    if tokio::time::Instant::now() + wait > until {
                        total.retrying = r.retrying.max(1);
                        return Ok(total);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Runs until `shutdown`: a round whenever mails were queued or one is due (at least every
    /// 30 s, which also takes over mails of a dispatcher that died).
    pub async fn run(self: Arc<Self>, shutdown: Arc<Notify>) {
        loop {
            let wait = match self.round().await {
                Ok(r) if r.sent + r.failed + r.retrying > 0 => Duration::ZERO,
                Ok(_) => match self.next_due().await {
                    Ok((Some(s), _)) => Duration::from_secs_f64(s.clamp(0.005, 30.0)),
                    Ok((None, _)) => Duration::from_secs(30),
                    Err(_) => Duration::from_secs(5),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "mail dispatcher round failed; retrying");
                    Duration::from_secs(5)
                }
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                _ = shutdown.notified() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

enum Attempt {
    Sent,
    Failed,
    Retrying,
    /// Another dispatcher took the mail over (this one's claim expired): nothing recorded.
    Lost,
}

/// The per-lead `dashboard.followup_completed` of an outcome.
pub fn completed_event(
    lead: Uuid,
    kind: Kind,
    success: bool,
    a: &LeadAudience,
    at: DateTime<Utc>,
) -> NewEvent {
    NewEvent::new(
        EventType::FollowupCompleted,
        Some(lead),
        at,
        envelope::key_followup(lead, kind.as_str(), at),
        json!({
            "leadId": lead, "followUpType": kind.as_str(),
            "t3Count": i64::from(kind == Kind::T3), "t7Count": i64::from(kind == Kind::T7),
            "success": success, "userId": "system", "ownerUserId": a.owner_user_id,
            "territory": a.territory, "processedAt": envelope::ts(at),
        }),
        Audience {
            territory: a.territory,
            owner: Some(a.owner_user_id.clone()),
            collaborators: a.collaborators.clone(),
        },
    )
}
