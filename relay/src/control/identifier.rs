//! User-visible identifiers: validation, the one normal form each type has, and the hash
//! they travel as in discovery.
//!
//! The hash is SHA-256 over `type ":" normal-form` (e.g. `phone:+491701234567`), written as
//! 64 lowercase hex digits. It keeps identifiers out of request logs and transit copies, but
//! it is not enough alone: phone numbers are low-entropy (a country's whole numbering plan
//! is hashed in minutes), so anyone can invert it by brute force. What protects users from
//! enumeration is what the relay does with it: only enlisted, discoverable users are ever
//! returned, a miss never says why, and every partner and requesting user is rate-limited.

use serde::{Deserialize, Serialize};

/// The identifier types networks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentifierType {
    /// E.164: `+`, country code, subscriber number; 8 to 15 digits in all.
    Phone,
    Email,
    /// 3 to 32 of `a-z 0-9 . _ -`, compared case-insensitively.
    Username,
}

impl IdentifierType {
    pub fn name(self) -> &'static str {
        match self {
            IdentifierType::Phone => "phone",
            IdentifierType::Email => "email",
            IdentifierType::Username => "username",
        }
    }
}

/// A validated identifier in its normal form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identifier {
    #[serde(rename = "type")]
    pub kind: IdentifierType,
    pub value: String,
}

impl Identifier {
    /// Validates `value` as a `kind` and brings it to its normal form.
    pub fn parse(kind: IdentifierType, value: &str) -> Result<Identifier, String> {
        let value = match kind {
            IdentifierType::Phone => normal_phone(value)?,
            IdentifierType::Email => normal_email(value)?,
            IdentifierType::Username => normal_username(value)?,
        };
        Ok(Identifier { kind, value })
    }

    /// SHA-256 of `type:value`.
    pub fn hash(&self) -> [u8; 32] {
        let text = format!("{}:{}", self.kind.name(), self.value);
        devkit::hex::sha256(text.as_bytes())
    }
}

fn normal_phone(value: &str) -> Result<String, String> {
    // Spaces, dashes, dots and brackets are formatting, not part of the number.
    let compact: String = value
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let digits = compact
        .strip_prefix('+')
        .ok_or("a phone number must be E.164: start with + and the country code")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a phone number holds digits only after the +".into());
    }
    if !(8..=15).contains(&digits.len()) {
        return Err(format!(
            "an E.164 number has 8 to 15 digits, this one {}",
            digits.len()
        ));
    }
    if digits.starts_with('0') {
        return Err("no country code starts with 0".into());
    }
    Ok(format!("+{digits}"))
}

fn normal_email(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.len() > 254 {
        return Err("an e-mail address has at most 254 characters".into());
    }
    let (local, domain) = value
        .rsplit_once('@')
        .ok_or("an e-mail address needs an @")?;
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c))
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..");
    if !local_ok {
        return Err("the part before the @ is not a valid mailbox".into());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !domain_ok {
        return Err("the part after the @ is not a domain name".into());
    }
    // Domains are case-insensitive; mailboxes are, in practice, everywhere that matters.
    Ok(format!(
        "{}@{}",
        local.to_ascii_lowercase(),
        domain.to_ascii_lowercase()
    ))
}

fn normal_username(value: &str) -> Result<String, String> {
    let lower = value.trim().to_ascii_lowercase();
    if !(3..=32).contains(&lower.len()) {
        return Err("a username has 3 to 32 characters".into());
    }
    if !lower
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    {
        return Err("a username holds a-z, 0-9, '.', '_' and '-' only".into());
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use devkit::hex::{hex, parse_hex32};

    use super::*;

    #[test]
    fn phone_numbers_are_e164() {
        let p = |v| Identifier::parse(IdentifierType::Phone, v).map(|i| i.value);
        assert_eq!(p("+49 170 123-4567").unwrap(), "+491701234567");
        assert!(p("0170 1234567").is_err());
        assert!(p("+0123456789").is_err());
        assert!(p("+4917012345678901").is_err());
        assert!(p("+49abc1234567").is_err());
        assert!(p("+1234567").is_err());
    }

    #[test]
    fn emails_and_usernames() {
        let e = |v| Identifier::parse(IdentifierType::Email, v).map(|i| i.value);
        assert_eq!(e("Alice@Example.ORG").unwrap(), "alice@example.org");
        for bad in [
            "alice",
            "@example.org",
            "a@b",
            "a..b@example.org",
            "a@-x.org",
        ] {
            assert!(e(bad).is_err(), "{bad}");
        }
        let u = |v| Identifier::parse(IdentifierType::Username, v).map(|i| i.value);
        assert_eq!(u("Alice_01").unwrap(), "alice_01");
        assert!(u("al").is_err());
        assert!(u("al ice").is_err());
        assert!(u(&"a".repeat(33)).is_err());
    }

    #[test]
    fn hashes_are_of_the_normal_form() {
        let a = Identifier::parse(IdentifierType::Phone, "+49 170 1234567").unwrap();
        let b = Identifier::parse(IdentifierType::Phone, "+491701234567").unwrap();
        assert_eq!(a.hash(), b.hash());
        assert_eq!(
            hex(&a.hash()),
            hex(&devkit::hex::sha256(b"phone:+491701234567"))
        );
        assert_eq!(parse_hex32(&hex(&a.hash())), Some(a.hash()));
        assert_eq!(parse_hex32("zz"), None);
        assert_eq!(parse_hex32(&"g".repeat(64)), None);
    }
}
