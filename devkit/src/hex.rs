//! Lowercase hex and SHA-256: how certificates, identifiers and keys are spelled in configs,
//! the control API and logs.

use std::fmt::Write as _;

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Exactly 64 hex digits (either case) as 32 bytes.
pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        // `to_digit`, not `from_str_radix`: the latter also takes a leading '+'.
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        *byte = u8::try_from(high << 4 | low).ok()?;
    }
    Some(out)
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// A certificate's fingerprint as configs spell it: SHA-256 of its DER, lowercase hex.
pub fn fingerprint_hex(der: &[u8]) -> String {
    hex(&sha256(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc_is_the_fips_vector() {
        assert_eq!(
            fingerprint_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hex_round_trips() {
        let bytes: [u8; 32] = std::array::from_fn(|i| u8::try_from(i * 8 + 7).unwrap());
        let text = hex(&bytes);
        assert_eq!(&text[..6], "070f17");
        assert_eq!(parse_hex32(&text), Some(bytes));
        assert_eq!(parse_hex32(&text.to_uppercase()), Some(bytes));
    }

    #[test]
    fn parse_hex32_wants_64_digits_and_nothing_else() {
        let good = "ab".repeat(32);
        assert!(parse_hex32(&good[..62]).is_none());
        assert!(parse_hex32(&format!("{good}0")).is_none());
        assert!(parse_hex32(&format!("+{}", &good[1..])).is_none());
        assert!(parse_hex32(&format!("g{}", &good[1..])).is_none());
        assert!(parse_hex32(&format!("é{}", &good[2..])).is_none());
    }
}
