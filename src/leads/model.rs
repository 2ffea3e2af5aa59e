//! Lead and activity rows, their JSON shapes and the request bodies.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::domain::{ActivityType, BusinessType, LeadSource, LeadStatus};
use crate::territory::Territory;

/// A lead as the API shows it (CONTRACT.md "Lead and activity JSON").
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lead {
    pub id: Uuid,
    pub company_name: String,
    pub contact_person: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub city: Option<String>,
    pub territory: Territory,
    pub business_type: BusinessType,
    pub source: LeadSource,
    pub status: LeadStatus,
    pub owner_user_id: String,
    pub collaborators: Vec<String>,
    pub email_consent: bool,
    pub contact_blocked: bool,
    pub clock_stopped: bool,
    pub registered_at: DateTime<Utc>,
    pub last_activity_at: Option<DateTime<Utc>>,
    pub t3_sent_at: Option<DateTime<Utc>>,
    pub t7_sent_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /api/leads`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateLead {
    pub company_name: String,
    pub city: Option<String>,
    pub business_type: BusinessType,
    pub source: LeadSource,
    pub contact_person: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub territory: Option<Territory>,
    #[serde(default)]
    pub email_consent: bool,
    #[serde(default)]
    pub collaborators: Vec<String>,
}

/// `PATCH /api/leads/{id}`: every field optional; `null` clears a contact field.
#[derive(Debug, Default, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchLead {
    pub status: Option<LeadStatus>,
    pub reason: Option<String>,
    pub owner_user_id: Option<String>,
    pub collaborators: Option<Vec<String>>,
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub contact_person: Option<Option<String>>,
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub email: Option<Option<String>>,
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub phone: Option<Option<String>>,
    pub email_consent: Option<bool>,
    pub contact_blocked: Option<bool>,
    pub clock_stopped: Option<bool>,
}

/// Distinguishes an absent field (no change) from an explicit `null` (clear).
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(d).map(Some)
    }
}

/// A logged activity.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    pub id: Uuid,
    pub lead_id: Uuid,
    #[serde(rename = "type")]
    pub activity_type: ActivityType,
    pub meaningful: bool,
    pub description: Option<String>,
    pub outcome: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub user_id: String,
}

/// `POST /api/leads/{id}/activities`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewActivity {
    #[serde(rename = "type")]
    pub activity_type: ActivityType,
    pub description: Option<String>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
}

/// One page of leads.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeadPage {
    pub items: Vec<Lead>,
    pub page: i64,
    pub size: i64,
    pub total: i64,
}
