//! The T+3/T+7 job: finds the leads due (DESIGN.md "Follow-ups"), and for each, in one
//! transaction as the `system` principal: claims the follow-up (the unique (lead, type) row makes
//! two runs never queue a mail twice), renders and queues the mail in the mail outbox, logs a
//! FOLLOW_UP activity and an audit row. The dispatcher ([`super::mailer`]) delivers it; the
//! per-lead `dashboard.followup_completed` event is published with the outcome (delivered or
//! failed after the last retry), because only then is `success` known. At the end of a run one
//! BATCH event carries the counts.
//!
//! Runs on the schedule (`freshplan.followup.cron`, one instance at a time by an advisory lock),
//! on `freshplan followups run` and `POST /api/followups/run`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use super::clock::Clock;
use super::mailer::{self, Dispatcher};
use super::repo::{self, DueLead, LeadAudience, NewMail};
use super::templates::{self, Kind, MailInput};
use super::token::{TokenSigner, UnsubscribeClaims};
use crate::config::FollowupSettings;
use crate::db;
use crate::error::ApiResult;
use crate::events::envelope::{self, Audience, EventType, NewEvent};
use crate::events::Publisher;
use crate::identity::Principal;
use crate::leads::domain::ActivityType;
use crate::leads::repo as leads_repo;
use crate::pii::{PiiField, Vault};
use crate::schedule::Schedule;
use crate::telemetry::metrics::Metrics;
use crate::territory::Territory;

/// Purpose of the key that signs unsubscribe links (derived from the PII lookup key).
pub const UNSUBSCRIBE_KEY_PURPOSE: &str = "unsubscribe-link-v1";

/// Advisory lock of the scheduled run: one instance at a time.
const SCHEDULE_LOCK: i64 = 0x4672_5368_4655_0001;

/// What a run did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// T+3 mails queued.
    pub t3_queued: i64,
    /// T+7 mails queued.
    pub t7_queued: i64,
    /// Follow-ups that failed at once (no deliverable address, unreadable contact data).
    pub failed: i64,
    /// The run's time (the job's clock).
    pub processed_at: DateTime<Utc>,
    /// Outbox position of the BATCH event (0 when an identical run in the same minute already
    /// published it).
    pub position: i64,
}

/// The job of one instance.
pub struct Job {
    pub pool: PgPool,
    pub vault: Arc<Vault>,
    pub publisher: Publisher,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<Clock>,
    pub settings: FollowupSettings,
    /// `freshplan.mail.from`
    pub mail_from: String,
    pub signer: TokenSigner,
    pub dispatcher: Arc<Dispatcher>,
}

impl Job {
    /// Runs once for the leads of `territory` (all when `None`), triggered by `trigger` (the
    /// scheduler and the command line pass the system principal). The job itself always
    /// acts as `system`.
    pub async fn run(
        &self,
        trigger: &Principal,
        territory: Option<Territory>,
    ) -> ApiResult<RunReport> {
        let now = envelope::micros(self.clock.now());
        let mut report = RunReport {
            t3_queued: 0,
            t7_queued: 0,
            failed: 0,
            processed_at: now,
            position: 0,
        };
        for kind in [Kind::T3, Kind::T7] {
            let started = Instant::now();
            loop {
                let (queued, failed, more) = self.batch(kind, now, territory).await?;
                match kind {
                    Kind::T3 => report.t3_queued += queued,
                    Kind::T7 => report.t7_queued += queued,
                }
                report.failed += failed;
                if queued > 0 {
                    self.dispatcher.wake.notify_one();
                }
                if !more {
                    break;
                }
            }
            self.metrics
                .followup_batch_duration
                .with_label_values(&[kind.as_str()])
                .observe(started.elapsed().as_secs_f64() * 1000.0);
        }
        report.position = self.publish_batch(trigger, territory, &report).await?;
        tracing::info!(
            trigger = %trigger.user_id,
            territory = territory.map(Territory::code).unwrap_or("all"),
            t3_queued = report.t3_queued,
            t7_queued = report.t7_queued,
            failed = report.failed,
            "follow-up run finished"
        );
        Ok(report)
    }

    /// One transaction: locks a batch of due leads and queues their mails. Returns (queued,
    /// failed at once, whether a full batch was found).
    async fn batch(
        &self,
        kind: Kind,
        now: DateTime<Utc>,
        territory: Option<Territory>,
    ) -> ApiResult<(i64, i64, bool)> {
        let system = Principal::system();
        let mut tx = db::begin_as(&self.pool, &system).await?;
        let due = repo::lock_due(&mut tx, kind, now, territory, self.settings.batch_size).await?;
        let more = due.len() as i64 == self.settings.batch_size;
        let (mut queued, mut failed_now) = (0, 0);
        let mut events = Vec::new();
        let mut failures = Vec::new();
        for lead in &due {
            let mail_id = Uuid::now_v7();
            let unsubscribe_url = format!(
                "{}/unsubscribe?token={}",
                self.settings.public_url,
                self.signer.sign(&UnsubscribeClaims {
                    token_id: mail_id,
                    lead_id: lead.id,
                    expires_at: now + chrono::Duration::days(self.settings.unsubscribe_valid_days),
                })
            );
            let prepared = self.prepare(lead, kind, now, mail_id, &unsubscribe_url);
            let template = prepared
                .as_ref()
                .map(|(t, _)| t.clone())
                .unwrap_or_else(|_| kind.as_str().to_string());
            let Some(followup) = repo::claim(&mut tx, lead, kind, &template, now).await? else {
                continue;
            };
            match prepared {
                Ok((template, sealed)) => {
                    repo::queue_mail(
                        &mut tx,
                        &NewMail {
                            id: mail_id,
                            followup_id: followup,
                            lead_id: lead.id,
                            kind,
                            territory: lead.territory,
                            template: &template,
                            key_id: self.vault.active_key_id(),
                            sealed: &sealed,
                            created_at: now,
                        },
                    )
                    .await?;
                    leads_repo::insert_activity(
                        &mut tx,
                        &leads_repo::NewActivityRow {
                            lead: lead.id,
                            kind: ActivityType::FollowUp,
                            description: Some(&format!(
                                "{} automatisch zum Versand eingereiht (Vorlage {template})",
                                match kind {
                                    Kind::T3 => "T+3-Nachfassmail „Probierbox“",
                                    Kind::T7 => "T+7-Mail „Großbestellung“",
                                }
                            )),
                            outcome: None,
                            occurred_at: now,
                            user: &system.user_id,
                            new_status: None,
                        },
                    )
                    .await?;
                    leads_repo::audit(
                        &mut tx,
                        &system,
                        "FOLLOWUP_QUEUED",
                        &lead.id.to_string(),
                        Some(lead.territory),
                        json!({"followUpType": kind.as_str(), "template": template, "mailId": mail_id}),
                    )
                    .await?;
                    queued += 1;
                }
                Err(reason) => {
                    repo::fail_claimed(&mut tx, followup, reason, now).await?;
                    leads_repo::audit(
                        &mut tx,
                        &system,
                        "FOLLOWUP_FAILED",
                        &lead.id.to_string(),
                        Some(lead.territory),
                        json!({"followUpType": kind.as_str(), "error": reason}),
                    )
                    .await?;
                    let audience = LeadAudience {
                        territory: lead.territory,
                        owner_user_id: lead.owner_user_id.clone(),
                        collaborators: lead.collaborators.clone(),
                    };
                    events.push(mailer::completed_event(
                        lead.id, kind, false, &audience, now,
                    ));
                    failures.push((lead.id, lead.territory, reason));
                    failed_now += 1;
                }
            }
        }
        self.publisher.commit(tx, &events).await?;
        for (lead, territory, reason) in failures {
            self.metrics
                .followup_sent
                .with_label_values(&[kind.as_str(), territory.code(), "failure"])
                .inc();
            tracing::warn!(lead_id = %lead, followup_type = kind.as_str(), territory = %territory, error = reason, "follow-up failed: no mail could be composed");
        }
        self.metrics
            .followup_automated
            .with_label_values(&[kind.metric_label()])
            .inc_by(queued as u64);
        Ok((queued, failed_now, more))
    }

    /// Renders, composes and seals the mail of a lead: (template id, sealed message), or why
    /// no mail can go out (no PII in the reason).
    fn prepare(
        &self,
        lead: &DueLead,
        kind: Kind,
        now: DateTime<Utc>,
        mail_id: Uuid,
        unsubscribe_url: &str,
    ) -> Result<(String, Vec<u8>), &'static str> {
        let key = lead
            .pii_key_id
            .as_deref()
            .ok_or("contact data unreadable")?;
        let email = lead
            .email_ct
            .as_deref()
            .map(|ct| self.vault.open(lead.id, PiiField::Email, key, ct))
            .transpose()
            .map_err(|_| "contact data unreadable")?
            .ok_or("no e-mail address")?;
        let contact_person = lead
            .contact_person_ct
            .as_deref()
            .map(|ct| self.vault.open(lead.id, PiiField::ContactPerson, key, ct))
            .transpose()
            .map_err(|_| "contact data unreadable")?;
        let local_date = now.with_timezone(&self.settings.timezone).date_naive();
        let rendered = templates::render(&MailInput {
            kind,
            business_type: lead.business_type,
            territory: lead.territory,
            company_name: &lead.company_name,
            contact_person: contact_person.as_deref(),
            sender_name: lead
                .owner_name
                .as_deref()
                .unwrap_or("Ihr FreshFoodz-Vertriebsteam"),
            date: local_date,
            unsubscribe_url,
        });
        let composed = mailer::compose(
            &self.mail_from,
            &email,
            mail_id,
            &rendered,
            unsubscribe_url,
            now,
        )
        .map_err(|_| "e-mail address not deliverable")?;
        Ok((
            rendered.template,
            mailer::seal(&self.vault, lead.id, &composed),
        ))
    }

    /// The BATCH `dashboard.followup_completed` of a run (and its audit row), in one transaction.
    async fn publish_batch(
        &self,
        trigger: &Principal,
        territory: Option<Territory>,
        r: &RunReport,
    ) -> ApiResult<i64> {
        let system = Principal::system();
        let at = r.processed_at;
        // The audience: the territory the run covered (a run over all goes to admins and the
        // managers of the triggering principal's territory) and whoever triggered it.
        let audience_territory = territory.unwrap_or(trigger.territory);
        let event = NewEvent::new(
            EventType::FollowupCompleted,
            None,
            at,
            envelope::key_followup_batch(at, &trigger.user_id, r.t3_queued, r.t7_queued),
            json!({
                "followUpType": "BATCH", "t3Count": r.t3_queued, "t7Count": r.t7_queued,
                "success": r.failed == 0, "userId": trigger.user_id,
                "territory": audience_territory, "processedAt": envelope::ts(at),
            }),
            Audience {
                territory: audience_territory,
                owner: Some(trigger.user_id.clone()),
                collaborators: Vec::new(),
            },
        );
        let mut tx = db::begin_as(&self.pool, &system).await?;
        sqlx::query(
            "INSERT INTO audit_log (actor_user_id, actor_role, action, entity_type, entity_id, territory, details) \
             VALUES ('system', 'system', 'FOLLOWUP_RUN', 'followup-run', $1, $2, $3)",
        )
        .bind(event.key.to_string())
        .bind(territory.map(Territory::code))
        .bind(json!({"triggeredBy": trigger.user_id, "t3Queued": r.t3_queued, "t7Queued": r.t7_queued, "failed": r.failed}))
        .execute(&mut *tx)
        .await?;
        Ok(self.publisher.commit(tx, &[event]).await?)
    }

    /// Runs the job at every firing of `schedule` (real time) until `shutdown`. Instances
    /// sharing a database take turns: the one that gets the advisory lock runs, the others skip
    /// that firing (claims are atomic anyway; the lock saves the duplicate work).
    pub async fn schedule(self: Arc<Self>, schedule: Schedule, shutdown: Arc<Notify>) {
        loop {
            let Some(next) = schedule.next_after(Utc::now()) else {
                return;
            };
            let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = shutdown.notified() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if let Err(e) = self.scheduled_run().await {
                tracing::warn!(error = %e, "scheduled follow-up run failed; next firing as planned");
            }
        }
    }

    async fn scheduled_run(&self) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(SCHEDULE_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        if !got {
            tracing::info!("another instance runs the scheduled follow-ups");
            return Ok(());
        }
        let result = self.run(&Principal::system(), None).await;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(SCHEDULE_LOCK)
            .execute(&mut *conn)
            .await?;
        result?;
        Ok(())
    }
}
