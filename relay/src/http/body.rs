//! Request bodies: JSON parsed into the control plane's request types, every failure a
//! `REQUEST_MALFORMED` that names what is wrong (messages start with `body: `). A number
//! written with a fraction of zero (`65596.0`, `1e3`) is an integer in JSON Schema, and so
//! in `docs/openapi.json`: it is taken as that integer. The fuzz target `api_body` feeds
//! arbitrary bytes to [`parse_any`].

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

use crate::control::{ApiError, ApiResult};

/// Parses a JSON body into `T`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let mut value: Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::malformed(format!("body: {e}")))?;
    integral_floats_to_integers(&mut value);
    serde_json::from_value(value).map_err(|e| ApiError::malformed(format!("body: {e}")))
}

/// The largest float below 2^64 is exactly representable; from 2^64 on a float is out of
/// every integer type the API reads.
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

/// Rewrites every float with no fractional part, within 64 bits, as an integer; nothing
/// else changes. Iterative, so a deeply nested body cannot overflow the stack (serde_json
/// already refuses nesting past 128 levels).
fn integral_floats_to_integers(value: &mut Value) {
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Number(number) => {
                if let Some(integer) = as_integer(number) {
                    *number = integer;
                }
            }
            Value::Array(items) => stack.extend(items.iter_mut()),
            Value::Object(fields) => stack.extend(fields.values_mut()),
            Value::Null | Value::Bool(_) | Value::String(_) => {}
        }
    }
}

#[allow(clippy::cast_possible_truncation)] // checked: integral and within range
fn as_integer(number: &Number) -> Option<Number> {
    if number.is_u64() || number.is_i64() {
        return None;
    }
    let float = number.as_f64()?;
    if float.fract() != 0.0 || !float.is_finite() {
        return None;
    }
    if (0.0..TWO_POW_64).contains(&float) {
        Some(Number::from(float as u64))
    } else if (-TWO_POW_63..0.0).contains(&float) {
        Some(Number::from(float as i64))
    } else {
        None
    }
}

/// The integer a path or query parameter spells, as plain decimal digits: `42`, and the
/// same integer as JSON writes it with a fraction or an exponent (`42.0`, `4.2e1`), which
/// JSON Schema (and so the document) calls an integer too. `None` for anything else: a
/// sign, a fraction that is not zero, not a number. The digits may be too many for the
/// field's type; its parser says so. An exponent past 64 is refused here (no 64-bit
/// integer has more digits), so the digits stay short.
pub fn integer_digits(text: &str) -> Option<Cow<'_, str>> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(text) {
        return Some(Cow::Borrowed(text));
    }
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => {
            let exponent = exponent.strip_prefix('+').unwrap_or(exponent);
            if !digits(exponent) {
                return None;
            }
            (mantissa, exponent.parse::<u32>().ok().filter(|e| *e <= 64)?)
        }
        None => (text, 0),
    };
    let (whole, fraction) = match mantissa.split_once('.') {
        // JSON has digits on both sides of a point.
        Some((whole, fraction)) if digits(fraction) => (whole, fraction.trim_end_matches('0')),
        Some(_) => return None,
        None => (mantissa, ""),
    };
    if !digits(whole) {
        return None;
    }
    let zeros = exponent.checked_sub(u32::try_from(fraction.len()).ok()?)?;
    let mut out = String::with_capacity(whole.len() + fraction.len() + zeros as usize);
    out.push_str(whole);
    out.push_str(fraction);
    out.extend(std::iter::repeat_n('0', zeros as usize));
    Some(Cow::Owned(out))
}

/// `PUT /v1/users/{network}/{user}/contact-book`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hashes {
    pub hashes: Vec<String>,
}

/// `PUT /v1/users/{network}/{user}/devices`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Devices {
    pub devices: Vec<u32>,
}

/// `POST /v1/discovery/lookup`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lookup {
    pub requester: crate::control::String32,
    pub identifier_hash: String,
}

/// Every request body type of the API, parsed from the same bytes: what the fuzz target
/// runs. Returns how many of them accepted the bytes.
pub fn parse_any(bytes: &[u8]) -> usize {
    use crate::control::discovery::DiscoveryRequest;
    use crate::control::keys::{Claim, KeyUpload};
    use crate::control::partners::{NewPartner, NewStatus};
    use crate::control::users::{Attestation, Enlistment, IdentifierChange};
    [
        parse::<NewPartner>(bytes).is_ok(),
        parse::<NewStatus>(bytes).is_ok(),
        parse::<Enlistment>(bytes).is_ok(),
        parse::<IdentifierChange>(bytes).is_ok(),
        parse::<Attestation>(bytes).is_ok(),
        parse::<DiscoveryRequest>(bytes).is_ok(),
        parse::<KeyUpload>(bytes).is_ok(),
        parse::<Claim>(bytes).is_ok(),
        parse::<Hashes>(bytes).is_ok(),
        parse::<Devices>(bytes).is_ok(),
        parse::<Lookup>(bytes).is_ok(),
    ]
    .into_iter()
    .filter(|ok| *ok)
    .count()
}

/// The fuzz target's checks (`fuzz/fuzz_targets/api_body.rs`; its seeds are replayed by
/// `relay/tests/api_body_corpus.rs`): no body panics any reader, and rewriting integral
/// floats changes no value and is done in one pass.
pub fn check(bytes: &[u8]) {
    parse_any(bytes);
    if let Ok(text) = std::str::from_utf8(bytes)
        && let Some(digits) = integer_digits(text)
    {
        assert!(
            digits.bytes().all(|b| b.is_ascii_digit()),
            "{text:?} gave {digits:?}"
        );
        assert!(
            digits.len() <= text.len() + 64,
            "{text:?} gave {} digits",
            digits.len()
        );
    }
    let Ok(original) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    let mut rewritten = original.clone();
    integral_floats_to_integers(&mut rewritten);
    assert!(
        same_values(&original, &rewritten),
        "{original} became {rewritten}"
    );
    let once = rewritten.clone();
    integral_floats_to_integers(&mut rewritten);
    assert_eq!(once, rewritten, "a second pass changed the body");
}

/// Equal but for how numbers are written.
fn same_values(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_values(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(key, x)| y.get(key).is_some_and(|y| same_values(x, y)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        small: u32,
        big: u64,
        signed: i64,
        list: Vec<u32>,
    }

    #[test]
    fn integers_written_as_floats_are_integers() {
        let parsed: Sample =
            parse(br#"{"small": 65596.0, "big": 1e19, "signed": -3.0, "list": [1, 2.0, 3e2]}"#)
                .unwrap();
        assert_eq!(
            parsed,
            Sample {
                small: 65596,
                big: 10_000_000_000_000_000_000,
                signed: -3,
                list: vec![1, 2, 300],
            }
        );
    }

    #[test]
    fn parameters_spell_integers_as_json_does() {
        for (text, digits) in [
            ("42", Some("42")),
            ("4294967294.0", Some("4294967294")),
            ("4.2e1", Some("42")),
            ("1E+3", Some("1000")),
            ("1.50e1", Some("15")),
            ("007", Some("007")),
            ("1.5", None),
            ("1e-1", None),
            ("+1", None),
            ("-1", None),
            (".5", None),
            ("1.", None),
            ("1e65", None),
            ("", None),
            ("0x10", None),
        ] {
            assert_eq!(integer_digits(text).as_deref(), digits, "{text:?}");
        }
    }

    #[test]
    fn fractions_and_out_of_range_numbers_are_refused_with_the_field_named() {
        for body in [
            r#"{"small": 1.5, "big": 1, "signed": 1, "list": []}"#,
            r#"{"small": 4294967296.0, "big": 1, "signed": 1, "list": []}"#,
            r#"{"small": 1, "big": 1.8446744073709552e19, "signed": 1, "list": []}"#,
            r#"{"small": 1, "big": -1.0, "signed": 1, "list": []}"#,
            r#"{"small": 1, "big": 1, "signed": 1, "list": [], "extra": 0}"#,
            "not json",
        ] {
            let error = parse::<Sample>(body.as_bytes()).unwrap_err();
            assert!(
                error.message.starts_with("body: "),
                "{body}: {}",
                error.message
            );
        }
    }
}
