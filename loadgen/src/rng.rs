//! Small, fast, deterministic random numbers (wyrand), so a seed reproduces a population and
//! a traffic pattern exactly. Not for anything secret: ids that must be unguessable come from
//! `ring`'s system generator.

/// A wyrand generator: 64 bits of state, good statistical quality, one multiply per draw.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0xA076_1D64_78BD_642F);
        let t = u128::from(self.state) * u128::from(self.state ^ 0xE703_7ED1_A0B4_28DB);
        high_half(t) ^ low_half(t)
    }

    /// Uniform in `0..n` (0 when `n` is 0), by Lemire's multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        high_half(u128::from(self.next_u64()) * u128::from(n))
    }

    /// Uniform in `0..n` for 32-bit ranges.
    pub fn below_u32(&mut self, n: u32) -> u32 {
        u32::try_from(self.below(u64::from(n))).unwrap_or(0)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        // 53 random bits: exactly representable, so the result is never 1.0.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        lo + self.below_u32(hi - lo + 1)
    }
}

/// The high 64 bits of a 128-bit product.
pub fn high_half(value: u128) -> u64 {
    u64::try_from(value >> 64).unwrap_or(u64::MAX)
}

/// The low 64 bits of a 128-bit value.
pub fn low_half(value: u128) -> u64 {
    u64::try_from(value & u128::from(u64::MAX)).unwrap_or(0)
}

/// A non-negative float as an integer: truncated, saturating at 0 and `u64::MAX` (NaN is 0),
/// which is what `as` does; named so the intent is visible.
#[allow(clippy::cast_possible_truncation)]
pub fn saturating_u64(x: f64) -> u64 {
    x as u64
}

/// A well-mixed 64-bit hash of a 64-bit value (splitmix64's finaliser).
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// 64 random bits from the operating system (for run tags that must differ between runs).
pub fn os_random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No OS randomness: fall back to the clock, which still differs between runs.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        return mix64(low_half(nanos));
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn ranges_hold() {
        let mut rng = Rng::new(3);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let v = rng.below(10);
            seen[usize::try_from(v).unwrap()] += 1;
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
            let b = rng.between(5, 7);
            assert!((5..=7).contains(&b));
        }
        // Roughly uniform: each bucket within 20% of the mean.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
        assert_eq!(rng.below(0), 0);
        assert_eq!(rng.between(4, 4), 4);
    }
}
