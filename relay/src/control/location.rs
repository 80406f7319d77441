//! The location rule: interop is for users located in the EEA. A network sends attestations
//! of where its users are; a user meets the rule while it has an attestation inside the EEA
//! no older than the window (the reference offer: present in the EEA within any 60
//! consecutive days; BEREC argues for four months, as the roaming fair-use rules use). The
//! same rule binds gatekeeper and partner users.

use serde::{Deserialize, Serialize};

/// The EEA: the 27 EU member states, Iceland, Liechtenstein and Norway (ISO 3166-1 alpha-2).
const EEA: [&str; 30] = [
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI", "NO",
];

pub fn in_eea(country: &str) -> bool {
    EEA.contains(&country)
}

/// An ISO 3166-1 alpha-2 code: two ASCII capital letters.
pub fn valid_country(country: &str) -> bool {
    country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase())
}

/// The rule as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum LocationRule {
    Off,
    /// An attestation inside the EEA within the last `window_days` days.
    Eea {
        window_days: u32,
    },
}

impl Default for LocationRule {
    /// BEREC's four months rather than the offer's 60 days: a shorter window cuts off users
    /// on an ordinary holiday (opinion, chapter 7).
    fn default() -> LocationRule {
        LocationRule::Eea { window_days: 120 }
    }
}

pub const DAY_MS: u64 = 24 * 60 * 60 * 1000;

impl LocationRule {
    /// Whether a user whose latest EEA attestation was at `last_in_eea_ms` meets the rule
    /// at `now_ms`, and until when it will.
    pub fn evaluate(self, now_ms: u64, last_in_eea_ms: Option<u64>) -> Standing {
        match self {
            LocationRule::Off => Standing {
                in_region: true,
                until_ms: None,
            },
            LocationRule::Eea { window_days } => {
                let until_ms =
                    last_in_eea_ms.map(|at| at.saturating_add(u64::from(window_days) * DAY_MS));
                Standing {
                    in_region: until_ms.is_some_and(|until| now_ms < until),
                    until_ms,
                }
            }
        }
    }

    pub fn describe(self) -> String {
        match self {
            LocationRule::Off => "off".into(),
            LocationRule::Eea { window_days } => format!("eea/{window_days}d"),
        }
    }
}

/// A user's standing under the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub in_region: bool,
    /// When the standing lapses without a newer EEA attestation.
    pub until_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_from_the_latest_eea_attestation() {
        let rule = LocationRule::Eea { window_days: 60 };
        let now = 1000 * DAY_MS;
        assert!(rule.evaluate(now, Some(now - 59 * DAY_MS)).in_region);
        assert!(!rule.evaluate(now, Some(now - 60 * DAY_MS)).in_region);
        assert!(!rule.evaluate(now, None).in_region);
        assert!(LocationRule::Off.evaluate(now, None).in_region);
        assert!(in_eea("NO") && in_eea("DE") && !in_eea("US") && !in_eea("GB"));
        assert!(valid_country("DE") && !valid_country("de") && !valid_country("DEU"));
    }
}
