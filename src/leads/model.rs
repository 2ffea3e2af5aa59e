//! Lead and activity rows, their JSON shapes and the request bodies.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::domain::{ActivityType, BusinessType, LeadSource, LeadStatus};
use crate::territory::Territory;

/// What the API accepts as input, stated once for the OpenAPI document and the validation in
/// `service` (which implements exactly these rules, so a value the document calls valid is
/// accepted and one it calls invalid answers 422 `invalid-field` naming the field).
///
/// Stored text must not contain control characters (Unicode Cc: NUL, escape, …); free text
/// (`description`, `reason`) may contain tab and line breaks. Lengths count characters (code
/// points) of the value as sent; surrounding white space is trimmed before storing, and an
/// optional field that is empty after trimming is stored as absent.
pub mod rules {
    use utoipa::openapi::schema::{ArrayBuilder, Object, ObjectBuilder, SchemaType, Type};

    pub const COMPANY_NAME_MAX: usize = 200;
    pub const CITY_MAX: usize = 120;
    pub const CONTACT_PERSON_MAX: usize = 200;
    pub const EMAIL_MAX: usize = 254;
    pub const PHONE_MAX: usize = 40;
    pub const DESCRIPTION_MAX: usize = 4000;
    pub const OUTCOME_MAX: usize = 64;
    /// A status change's reason is stored as the outcome of its STATUS_CHANGE activity.
    pub const REASON_MAX: usize = OUTCOME_MAX;
    pub const USER_ID_MAX: usize = 128;
    pub const COLLABORATORS_MAX: usize = 50;
    /// Search text (`q`) of the lead list.
    pub const SEARCH_MAX: usize = 200;

    /// One line of text: no control character.
    pub const LINE: &str = r"^[^\u0000-\u001f\u007f-\u009f]*$";
    /// A line with at least one character that is not white space.
    pub const NON_BLANK_LINE: &str = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$";
    /// Free text: no control character but tab, line feed and carriage return.
    pub const TEXT: &str = r"^[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]*$";
    /// `local@domain` (the domain with an inner dot), or blank; white space around is trimmed.
    pub const EMAIL: &str = r"^[ \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*(?:[^@\s\u0000-\u001f\u007f-\u009f]+@[^@.\s\u0000-\u001f\u007f-\u009f][^@\s\u0000-\u001f\u007f-\u009f]*\.[^@\s\u0000-\u001f\u007f-\u009f]*[^@.\s\u0000-\u001f\u007f-\u009f])?[ \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$";
    /// Digits with ` + - ( ) / .` between them, or blank: `+` and 8 to 15 digits, `00` and 8 to
    /// 15 digits, a national `0` number of 7 to 14 digits (the territory's calling code is put in
    /// front), or 8 to 15 digits.
    pub const PHONE: &str = r"^[ \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*(?:(?:\+(?:[ +()/.\-]*[0-9]){8,15}|(?:[()/.\-][ +()/.\-]*)?(?:0[ +()/.\-]*0(?:[ +()/.\-]*[0-9]){8,15}|0[ +()/.\-]*[1-9](?:[ +()/.\-]*[0-9]){5,12}|[1-9](?:[ +()/.\-]*[0-9]){7,14}))(?:[ +()/.\-]*[+()/.\-])?)?[ \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$";
    /// The `If-Match` of a lead change: its `ETag` (weak or strong), quotes optional.
    pub const IF_MATCH: &str = r#"^(?:W/)?(?:"[0-9]{1,18}"|[0-9]{1,18})$"#;

    fn string(nullable: bool, pattern: &str, max: usize, description: &str) -> Object {
        let ty = if nullable {
            SchemaType::from_iter([Type::String, Type::Null])
        } else {
            SchemaType::Type(Type::String)
        };
        ObjectBuilder::new()
            .schema_type(ty)
            .pattern(Some(pattern))
            .max_length(Some(max))
            .description(Some(description))
            .build()
    }

    pub fn company_name() -> Object {
        string(
            false,
            NON_BLANK_LINE,
            COMPANY_NAME_MAX,
            "Company name: one line, not blank",
        )
    }
    pub fn city() -> Object {
        string(true, LINE, CITY_MAX, "City: one line")
    }
    pub fn contact_person() -> Object {
        string(
            true,
            LINE,
            CONTACT_PERSON_MAX,
            "Contact person (encrypted at rest): one line; `null` or blank clears it on PATCH",
        )
    }
    pub fn email() -> Object {
        string(true, EMAIL, EMAIL_MAX, "Contact email (encrypted at rest, stored lower-case): `local@domain`; `null` or blank clears it on PATCH")
    }
    pub fn phone() -> Object {
        string(true, PHONE, PHONE_MAX, "Contact phone (encrypted at rest): digits with ` + - ( ) / .`; national numbers (leading 0) take the territory's calling code, 8 to 15 digits in international form; `null` or blank clears it on PATCH")
    }
    pub fn description() -> Object {
        string(
            true,
            TEXT,
            DESCRIPTION_MAX,
            "Free text (tab and line breaks allowed)",
        )
    }
    pub fn outcome() -> Object {
        string(true, LINE, OUTCOME_MAX, "Outcome: one line")
    }
    pub fn reason() -> Object {
        string(
            true,
            TEXT,
            REASON_MAX,
            "Why the status changed (stored as the outcome of the STATUS_CHANGE activity)",
        )
    }
    pub fn user_id() -> Object {
        let mut o = string(
            false,
            LINE,
            USER_ID_MAX,
            "Id of a FreshPlan user of the lead's territory",
        );
        o.min_length = Some(1);
        o
    }
    /// `ownerUserId` of a PATCH (`null`: no change).
    pub fn user_id_nullable() -> Object {
        let mut o = user_id();
        o.schema_type = SchemaType::from_iter([Type::String, Type::Null]);
        o
    }
    /// The `email` filter of the lead list.
    pub fn email_filter() -> Object {
        string(false, EMAIL, EMAIL_MAX, "Exact contact email (any spelling; matched by keyed hash, never decrypted for search); blank is no filter")
    }
    fn user_ids(nullable: bool) -> utoipa::openapi::schema::Array {
        ArrayBuilder::new()
            .schema_type(if nullable {
                SchemaType::from_iter([Type::Array, Type::Null])
            } else {
                SchemaType::Type(Type::Array)
            })
            .items(user_id())
            .max_items(Some(COLLABORATORS_MAX))
            .description(Some("Ids of FreshPlan users of the lead's territory (the owner is dropped from the list)"))
            .build()
    }
    pub fn collaborators() -> utoipa::openapi::schema::Array {
        user_ids(false)
    }
    pub fn collaborators_patch() -> utoipa::openapi::schema::Array {
        user_ids(true)
    }
    /// The activity types a user may log (the others are written by the service itself).
    pub fn manual_activity_type() -> Object {
        let values: Vec<&str> = super::ActivityType::ALL
            .iter()
            .filter(|t| t.is_manual())
            .map(|t| t.as_str())
            .collect();
        super::super::domain::string_enum(
            "Kind of activity a user may log (STATUS_CHANGE, LEAD_ASSIGNED and CREATED are written by the service)",
            &values,
        )
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
    /// Changes so far; the `ETag` of the lead.
    #[schema(minimum = 1)]
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /api/leads`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateLead {
    #[schema(schema_with = rules::company_name)]
    pub company_name: String,
    #[schema(schema_with = rules::city)]
    pub city: Option<String>,
    pub business_type: BusinessType,
    pub source: LeadSource,
    #[schema(schema_with = rules::contact_person)]
    pub contact_person: Option<String>,
    #[schema(schema_with = rules::email)]
    pub email: Option<String>,
    #[schema(schema_with = rules::phone)]
    pub phone: Option<String>,
    /// Managers and admins only (a sales user may name only their own); default the creator's.
    #[schema(nullable = true)]
    pub territory: Option<Territory>,
    #[serde(default)]
    pub email_consent: bool,
    #[serde(default)]
    #[schema(schema_with = rules::collaborators)]
    pub collaborators: Vec<String>,
}

/// `PATCH /api/leads/{id}`: every field optional; `null` clears a contact field.
#[derive(Debug, Default, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchLead {
    /// The new status; the status machine decides (409 `invalid-transition`).
    #[schema(nullable = true)]
    pub status: Option<LeadStatus>,
    #[schema(schema_with = rules::reason)]
    pub reason: Option<String>,
    #[schema(schema_with = rules::user_id_nullable)]
    pub owner_user_id: Option<String>,
    #[schema(schema_with = rules::collaborators_patch)]
    pub collaborators: Option<Vec<String>>,
    #[serde(default, with = "double_option")]
    #[schema(schema_with = rules::contact_person)]
    pub contact_person: Option<Option<String>>,
    #[serde(default, with = "double_option")]
    #[schema(schema_with = rules::email)]
    pub email: Option<Option<String>>,
    #[serde(default, with = "double_option")]
    #[schema(schema_with = rules::phone)]
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
    #[schema(schema_with = rules::manual_activity_type)]
    pub activity_type: ActivityType,
    #[schema(schema_with = rules::description)]
    pub description: Option<String>,
    /// When it happened (RFC 3339); default now; at most 5 minutes in the future.
    #[schema(nullable = true)]
    pub occurred_at: Option<DateTime<Utc>>,
    #[schema(schema_with = rules::outcome)]
    pub outcome: Option<String>,
}

/// One page of leads.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeadPage {
    pub items: Vec<Lead>,
    #[schema(minimum = 0, maximum = 100000)]
    pub page: i64,
    #[schema(minimum = 1, maximum = 500)]
    pub size: i64,
    /// Leads matching the filter that the caller sees, on all pages.
    #[schema(minimum = 0)]
    pub total: i64,
}
