//! Lead and activity rows, their JSON shapes and the request bodies.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::domain::{ActivityType, BusinessType, LeadSource, LeadStatus};
use crate::pii::{PiiError, PiiField, Vault};
use crate::territory::Territory;

/// Columns of a lead as selected by [`LEAD_COLUMNS`].
#[derive(Debug, sqlx::FromRow)]
pub struct LeadRow {
    pub id: Uuid,
    pub company_name: String,
    pub contact_person_ct: Option<Vec<u8>>,
    pub email_ct: Option<Vec<u8>>,
    pub phone_ct: Option<Vec<u8>>,
    pub pii_key_id: Option<String>,
    pub city: Option<String>,
    pub territory: String,
    pub business_type: String,
    pub source: String,
    pub owner_user_id: String,
    pub collaborators: Vec<String>,
    pub status: String,
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

/// The select list matching [`LeadRow`].
pub const LEAD_COLUMNS: &str =
    "id, company_name, contact_person_ct, email_ct, phone_ct, pii_key_id, \
    city, territory, business_type, source, owner_user_id, collaborators, status, email_consent, \
    contact_blocked, clock_stopped, registered_at, last_activity_at, t3_sent_at, t7_sent_at, \
    version, created_at, updated_at";

impl LeadRow {
    /// Parsed status (the CHECK constraint guarantees a known value).
    pub fn status(&self) -> LeadStatus {
        LeadStatus::parse(&self.status).unwrap_or(LeadStatus::Deleted)
    }

    /// Parsed territory.
    pub fn territory(&self) -> Territory {
        self.territory.parse().unwrap_or(Territory::DE)
    }

    /// Decrypts one contact field.
    pub fn open(&self, vault: &Vault, field: PiiField) -> Result<Option<String>, PiiError> {
        let blob = match field {
            PiiField::ContactPerson => &self.contact_person_ct,
            PiiField::Email => &self.email_ct,
            PiiField::Phone => &self.phone_ct,
        };
        match (blob, &self.pii_key_id) {
            (Some(b), Some(k)) => vault.open(self.id, field, k, b).map(Some),
            (Some(_), None) => Err(PiiError::UnknownKey {
                lead: self.id,
                key_id: String::new(),
            }),
            _ => Ok(None),
        }
    }

    /// The API representation with decrypted contact data.
    pub fn into_lead(self, vault: &Vault) -> Result<Lead, PiiError> {
        let contact_person = self.open(vault, PiiField::ContactPerson)?;
        let email = self.open(vault, PiiField::Email)?;
        let phone = self.open(vault, PiiField::Phone)?;
        Ok(Lead {
            id: self.id,
            company_name: self.company_name,
            contact_person,
            email,
            phone,
            city: self.city,
            territory: self.territory.parse().unwrap_or(Territory::DE),
            business_type: BusinessType::parse(&self.business_type)
                .unwrap_or(BusinessType::Sonstiges),
            source: LeadSource::parse(&self.source).unwrap_or(LeadSource::Sonstiges),
            status: LeadStatus::parse(&self.status).unwrap_or(LeadStatus::Deleted),
            owner_user_id: self.owner_user_id,
            collaborators: self.collaborators,
            email_consent: self.email_consent,
            contact_blocked: self.contact_blocked,
            clock_stopped: self.clock_stopped,
            registered_at: self.registered_at,
            last_activity_at: self.last_activity_at,
            t3_sent_at: self.t3_sent_at,
            t7_sent_at: self.t7_sent_at,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
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
    #[sqlx(rename = "activity_type")]
    #[serde(rename = "type")]
    #[schema(value_type = ActivityType)]
    pub activity_type: String,
    pub meaningful: bool,
    pub description: Option<String>,
    pub outcome: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub user_id: String,
}

/// `POST /api/leads/{id}/activities`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
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
