//! Lead vocabulary: status machine, business types, sources and activity types.
//! Rules live in the types so a handler cannot forget them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::Role;

/// An enum spelled on the wire (JSON, query parameters, database) as `$wire`. Its OpenAPI schema
/// is written here, not derived: utoipa does not see serde renames passed through a macro and
/// would document the Rust variant names.
macro_rules! wire_enum {
    (#[doc = $doc:literal] $name:ident { $($variant:ident = $wire:literal),+ $(,)? }) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $(#[serde(rename = $wire)] $variant),+ }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                string_enum($doc.trim(), &[$($wire),+]).into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire and database spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }

            /// Parses the wire spelling (as stored in the database).
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($wire => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }

        crate::text_column!($name);
    };
}

/// The schema of a string enum with exactly `values`.
pub fn string_enum(description: &str, values: &[&str]) -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .enum_values(Some(values.iter().copied()))
        .build()
}

wire_enum!(
    /// Where a lead is in its life.
    LeadStatus {
        Registered = "REGISTERED", Active = "ACTIVE", Reminder = "REMINDER",
        GracePeriod = "GRACE_PERIOD", Qualified = "QUALIFIED", Converted = "CONVERTED",
        Lost = "LOST", Expired = "EXPIRED", Deleted = "DELETED",
    }
);
wire_enum!(
    /// The customer's kind of business.
    BusinessType {
        Restaurant = "RESTAURANT", Hotel = "HOTEL", Catering = "CATERING", Kantine = "KANTINE",
        Grosshandel = "GROSSHANDEL", Leh = "LEH", Bildung = "BILDUNG", Gesundheit = "GESUNDHEIT",
        Sonstiges = "SONSTIGES",
    }
);
wire_enum!(
    /// How the lead reached FreshPlan.
    LeadSource {
        Messe = "MESSE", Empfehlung = "EMPFEHLUNG", Telefon = "TELEFON",
        WebFormular = "WEB_FORMULAR", Partner = "PARTNER", Sonstiges = "SONSTIGES",
    }
);
wire_enum!(
    /// Kinds of logged activity.
    ActivityType {
        QualifiedCall = "QUALIFIED_CALL", Meeting = "MEETING", Demo = "DEMO",
        RoiPresentation = "ROI_PRESENTATION", SampleSent = "SAMPLE_SENT", Email = "EMAIL",
        Call = "CALL", Order = "ORDER", Note = "NOTE", FollowUp = "FOLLOW_UP",
        EmailReceived = "EMAIL_RECEIVED", StatusChange = "STATUS_CHANGE",
        LeadAssigned = "LEAD_ASSIGNED", Created = "CREATED",
    }
);

impl ActivityType {
    /// Meaningful contacts count towards response rates (EMAIL_RECEIVED is a response too).
    pub fn is_meaningful(self) -> bool {
        use ActivityType::*;
        matches!(
            self,
            QualifiedCall | Meeting | Demo | RoiPresentation | SampleSent | Email | Call | Order
        )
    }

    /// Types a user may log by hand; the others are written by the system.
    pub fn is_manual(self) -> bool {
        !matches!(
            self,
            ActivityType::StatusChange | ActivityType::LeadAssigned | ActivityType::Created
        )
    }
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionError {
    pub from: LeadStatus,
    pub to: LeadStatus,
    pub reason: &'static str,
}

impl LeadStatus {
    /// The table of DESIGN.md, without the role and clock rules.
    pub fn allowed_targets(self) -> &'static [LeadStatus] {
        use LeadStatus::*;
        match self {
            Registered => &[Active, Qualified, Expired],
            Active => &[Qualified, Reminder, Expired],
            Reminder => &[Active, GracePeriod, Qualified, Expired],
            GracePeriod => &[Active, Qualified, Expired],
            Qualified => &[Converted, Lost],
            Expired => &[Active],
            Converted | Lost | Deleted => &[],
        }
    }

    /// Checks a change of status by a user with `role` while the lead's clock is (not)
    /// stopped. Deletion (soft) is allowed from any non-deleted status; who may delete is
    /// decided by the caller's relation to the lead, not here.
    pub fn transition(
        self,
        to: LeadStatus,
        role: Role,
        clock_stopped: bool,
    ) -> Result<LeadStatus, TransitionError> {
        let err = |reason| {
            Err(TransitionError {
                from: self,
                to,
                reason,
            })
        };
        if self == LeadStatus::Deleted {
            return err("the lead is deleted");
        }
        if to == LeadStatus::Deleted {
            return Ok(to);
        }
        if clock_stopped {
            return err("the lead's clock is stopped: only deletion is allowed");
        }
        if !self.allowed_targets().contains(&to) {
            return err("not allowed by the lead status machine");
        }
        if self == LeadStatus::Expired
            && !matches!(role, Role::Manager | Role::Admin | Role::System)
        {
            return err("only a manager or admin may reactivate an expired lead");
        }
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wire_names_are_screaming_snake_case() {
        assert_eq!(LeadStatus::GracePeriod.as_str(), "GRACE_PERIOD");
        assert_eq!(LeadSource::WebFormular.as_str(), "WEB_FORMULAR");
        assert_eq!(ActivityType::RoiPresentation.as_str(), "ROI_PRESENTATION");
        assert_eq!(LeadStatus::parse("QUALIFIED"), Some(LeadStatus::Qualified));
        assert_eq!(
            serde_json::to_string(&LeadStatus::GracePeriod).unwrap(),
            "\"GRACE_PERIOD\""
        );
    }

    /// The transition table of DESIGN.md, written out independently of `allowed_targets`.
    fn expected(from: LeadStatus, to: LeadStatus, role: Role, stopped: bool) -> bool {
        use LeadStatus::*;
        if from == Deleted {
            return false;
        }
        if to == Deleted {
            return true;
        }
        if stopped {
            return false;
        }
        let table: &[(LeadStatus, LeadStatus)] = &[
            (Registered, Active),
            (Registered, Qualified),
            (Registered, Expired),
            (Active, Qualified),
            (Active, Reminder),
            (Active, Expired),
            (Reminder, Active),
            (Reminder, GracePeriod),
            (Reminder, Qualified),
            (Reminder, Expired),
            (GracePeriod, Active),
            (GracePeriod, Qualified),
            (GracePeriod, Expired),
            (Qualified, Converted),
            (Qualified, Lost),
            (Expired, Active),
        ];
        let may_reactivate = matches!(role, Role::Manager | Role::Admin | Role::System);
        table.contains(&(from, to)) && (from != Expired || may_reactivate)
    }

    fn status() -> impl Strategy<Value = LeadStatus> {
        proptest::sample::select(LeadStatus::ALL.to_vec())
    }
    fn role() -> impl Strategy<Value = Role> {
        proptest::sample::select(vec![
            Role::Viewer,
            Role::Sales,
            Role::Manager,
            Role::Admin,
            Role::System,
        ])
    }

    proptest! {
        #[test]
        fn every_transition_follows_the_design_table(from in status(), to in status(), role in role(), stopped in any::<bool>()) {
            prop_assert_eq!(from.transition(to, role, stopped).is_ok(), expected(from, to, role, stopped));
        }
    }

    #[test]
    fn the_whole_table_is_covered_exhaustively() {
        let mut allowed = 0;
        for &from in LeadStatus::ALL {
            for &to in LeadStatus::ALL {
                for role in [Role::Sales, Role::Manager] {
                    for stopped in [false, true] {
                        let ok = from.transition(to, role, stopped).is_ok();
                        assert_eq!(
                            ok,
                            expected(from, to, role, stopped),
                            "{from}->{to} {role} {stopped}"
                        );
                        allowed += ok as usize;
                    }
                }
            }
        }
        assert!(allowed > 0);
        assert!(LeadStatus::Converted
            .transition(LeadStatus::Active, Role::Admin, false)
            .is_err());
        assert!(LeadStatus::Expired
            .transition(LeadStatus::Active, Role::Sales, false)
            .is_err());
        assert!(LeadStatus::Expired
            .transition(LeadStatus::Active, Role::Manager, false)
            .is_ok());
    }
}
