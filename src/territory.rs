//! Territories: the data space of row-level security.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One of FreshPlan's sales territories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Territory {
    DE,
    AT,
    CH,
}

impl Territory {
    /// Every territory.
    pub const ALL: [Territory; 3] = [Territory::DE, Territory::AT, Territory::CH];

    /// The ISO code used in the database and on the wire.
    pub fn code(self) -> &'static str {
        match self {
            Territory::DE => "DE",
            Territory::AT => "AT",
            Territory::CH => "CH",
        }
    }

    /// Country calling code used to normalise national phone numbers.
    pub fn calling_code(self) -> &'static str {
        match self {
            Territory::DE => "49",
            Territory::AT => "43",
            Territory::CH => "41",
        }
    }
}

impl fmt::Display for Territory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl FromStr for Territory {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "DE" => Ok(Territory::DE),
            "AT" => Ok(Territory::AT),
            "CH" => Ok(Territory::CH),
            other => Err(format!(
                "unknown territory `{other}` (expected DE, AT or CH)"
            )),
        }
    }
}

crate::text_column!(Territory, code);

/// Stores an enum with a `parse(&str) -> Option<Self>` (or `FromStr`) in a `text` column: it
/// encodes its wire spelling and decoding an unknown value is an error naming the type and the
/// value, never a silent default.
#[macro_export]
macro_rules! text_column {
    ($name:ident) => {
        $crate::text_column!(@impl $name, as_str, |s: &str| $name::parse(s));
    };
    ($name:ident, $to:ident) => {
        $crate::text_column!(@impl $name, $to, |s: &str| s.parse::<$name>().ok());
    };
    (@impl $name:ident, $to:ident, $parse:expr) => {
        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                let parse = $parse;
                parse(s).ok_or_else(|| {
                    format!("unknown {} `{s}` in the database", stringify!($name)).into()
                })
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.$to(), buf)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }
    };
}
