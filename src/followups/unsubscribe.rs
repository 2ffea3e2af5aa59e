//! The unsubscribe link of a follow-up mail: checks a signed token and withdraws the lead's
//! e-mail consent once (an activity, an audit row and the published change in one transaction,
//! as `system`). An expired, tampered, unknown or already used link changes nothing.

use std::sync::Arc;

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::clock::Clock;
use super::pages::InvalidReason;
use super::repo;
use super::token::TokenSigner;
use crate::db;
use crate::error::ApiResult;
use crate::events::envelope::{self, Audience, EventType, NewEvent};
use crate::events::Publisher;
use crate::identity::Principal;
use crate::leads::domain::ActivityType;
use crate::leads::repo as leads_repo;

/// What a link is worth.
#[derive(Debug, PartialEq, Eq)]
pub enum Link {
    /// Valid and unused: the lead's company name (for the confirmation page).
    Valid(String),
    /// Used before: nothing changes.
    Used(String),
    Invalid(InvalidReason),
}

/// The outcome of `POST /unsubscribe`.
#[derive(Debug, PartialEq, Eq)]
pub enum Redeemed {
    /// Consent withdrawn (or it already was): the company name.
    Done(String),
    Used(String),
    Invalid(InvalidReason),
}

/// The unsubscribe use cases.
pub struct Unsubscribe {
    pub pool: PgPool,
    pub signer: TokenSigner,
    pub clock: Arc<Clock>,
    pub publisher: Publisher,
}

impl Unsubscribe {
    /// Checks a link without changing anything (`GET /unsubscribe`).
    pub async fn check(&self, token: &str) -> ApiResult<Link> {
        let claims = match self.signer.verify(token, self.clock.now()) {
            Ok(c) => c,
            Err(e) => return Ok(Link::Invalid(e.into())),
        };
        let mut tx = db::begin_as(&self.pool, &Principal::system()).await?;
        let (lead, used) =
            repo::unsubscribe_target(&mut tx, claims.token_id, claims.lead_id, false).await?;
        tx.commit().await?;
        Ok(match (lead, used) {
            (None, _) => Link::Invalid(InvalidReason::Unknown),
            (Some(l), true) => Link::Used(l.company_name),
            (Some(l), false) => Link::Valid(l.company_name),
        })
    }

    /// Withdraws the consent the link names (`POST /unsubscribe`).
    pub async fn redeem(&self, token: &str) -> ApiResult<Redeemed> {
        let now = envelope::micros(self.clock.now());
        let claims = match self.signer.verify(token, now) {
            Ok(c) => c,
            Err(e) => return Ok(Redeemed::Invalid(e.into())),
        };
        let system = Principal::system();
        let mut tx = db::begin_as(&self.pool, &system).await?;
        let (lead, used) =
            repo::unsubscribe_target(&mut tx, claims.token_id, claims.lead_id, true).await?;
        let Some(lead) = lead else {
            return Ok(Redeemed::Invalid(InvalidReason::Unknown));
        };
        if used || !repo::redeem(&mut tx, claims.token_id, claims.lead_id, now).await? {
            return Ok(Redeemed::Used(lead.company_name));
        }
        let mut events = Vec::new();
        if lead.email_consent {
            let activity = leads_repo::insert_activity(
                &mut tx,
                &leads_repo::NewActivityRow {
                    lead: claims.lead_id,
                    kind: ActivityType::Note,
                    description: Some(
                        "E-Mail-Einwilligung über den Abmeldelink einer Follow-up-Mail widerrufen",
                    ),
                    outcome: None,
                    occurred_at: now,
                    user: &system.user_id,
                    new_status: None,
                },
            )
            .await?;
            events.push(event(claims.lead_id, activity, &lead, now));
        }
        leads_repo::audit(
            &mut tx,
            &system,
            "EMAIL_CONSENT_WITHDRAWN",
            &claims.lead_id.to_string(),
            Some(lead.territory),
            json!({"via": "unsubscribe-link", "tokenId": claims.token_id, "consentWas": lead.email_consent}),
        )
        .await?;
        self.publisher.commit(tx, &events).await?;
        tracing::info!(lead_id = %claims.lead_id, territory = %lead.territory, "e-mail consent withdrawn through an unsubscribe link");
        Ok(Redeemed::Done(lead.company_name))
    }
}

fn event(
    lead: Uuid,
    activity: Uuid,
    l: &repo::UnsubscribeLead,
    at: chrono::DateTime<chrono::Utc>,
) -> NewEvent {
    NewEvent::new(
        EventType::ActivityLogged,
        Some(lead),
        at,
        envelope::key_activity(activity),
        json!({
            "leadId": lead, "activityType": ActivityType::Note, "ownerUserId": l.owner_user_id,
            "territory": l.territory, "userId": "system", "occurredAt": envelope::ts(at),
        }),
        Audience {
            territory: l.territory,
            owner: Some(l.owner_user_id.clone()),
            collaborators: l.collaborators.clone(),
        },
    )
}
