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
