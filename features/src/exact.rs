//! Exact, order-independent summation of `f64` values.
//!
//! [`ExactSum`] holds the *exact* sum of every finite double added to it, as a fixed-point integer
//! in units of 2⁻¹⁰⁷⁴ (the smallest subnormal), wide enough for the whole double range plus 2⁶⁴
//! additions of headroom. Adding, merging and retracting are exact integer operations, so the
//! state does not depend on the order values arrive in or on how they were split into partial
//! states; [`ExactSum::to_f64`] rounds once, to nearest with ties to even — the value Python's
//! `math.fsum` returns. This is why a pane of a sliding window can carry its partial sum and be
//! merged into (and later subtracted from) a window without breaking bit-for-bit parity.
//!
//! Non-finite inputs are counted, not added: any NaN, or both infinities, give NaN; otherwise an
//! infinity wins. Counting keeps retraction exact for them too. An exact zero rounds to `+0.0`.
//!
//! Representation: up to 68 signed 64-bit limbs, each holding a 32-bit "digit" plus room for lazy
//! carries (the layout of Radford Neal's small superaccumulator). An addition touches at most three
//! limbs; carries are propagated only every 2²⁹ operations or when rounding. Only the limbs a sum
//! has touched are stored (a short vector starting at limb `base`), and only those in `lo..=hi`
//! can be non-zero: typical money amounts need three or four limbs, so a window's sum takes
//! tens of bytes rather than the whole range's 544, and merges touch a handful of limbs. A
//! normalized sum has every limb below the top one in `[0, 2³²)` and the sign in the top one.
//!
//! Written here rather than taken from a crate because the window engine needs three things the
//! published exact-sum crates do not offer together: merging two partial states, retracting one,
//! and a compact serializable state.

use std::fmt;

const DIGIT_BITS: u32 = 32;
const LIMBS: usize = 68;
const DIGIT_MASK: i64 = (1 << DIGIT_BITS) - 1;
/// Operations allowed between carry propagations: each changes a limb by less than 2³², and
/// a merge may add another accumulator's whole headroom, so 2²⁹ + 2²⁹ operations of 2³² stay far
/// from i64 overflow.
const CARRY_LIMIT: u32 = 1 << 29;

/// An exact running sum of doubles; see the module documentation.
#[derive(Clone)]
pub struct ExactSum {
    /// Limbs `base..base + limbs.len()`; every other limb is zero.
    limbs: Vec<i64>,
    base: usize,
    lo: usize,
    hi: usize,
    pending: u32,
    nan: i64,
    pos_inf: i64,
    neg_inf: i64,
}

impl Default for ExactSum {
    fn default() -> Self {
        ExactSum { limbs: Vec::new(), base: 0, lo: LIMBS, hi: 0, pending: 0, nan: 0, pos_inf: 0, neg_inf: 0 }
    }
}

impl PartialEq for ExactSum {
    /// The same state: counters, carry state and limbs (whatever storage each side reserved).
    fn eq(&self, other: &Self) -> bool {
        (self.nan, self.pos_inf, self.neg_inf, self.lo, self.hi, self.pending)
            == (other.nan, other.pos_inf, other.neg_inf, other.lo, other.hi, other.pending)
            && (self.lo..=self.hi).all(|limb| self.limb(limb) == other.limb(limb))
    }
}

impl Eq for ExactSum {}

impl fmt::Debug for ExactSum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExactSum({:e})", self.to_f64())
    }
}

impl ExactSum {
    /// An empty sum (exactly zero).
    pub fn new() -> Self {
        Self::default()
    }

    /// Limb `limb` (zero when not stored).
    fn limb(&self, limb: usize) -> i64 {
        limb.checked_sub(self.base).and_then(|i| self.limbs.get(i)).copied().unwrap_or(0)
    }

    /// Limb `limb`, stored from now on.
    fn limb_mut(&mut self, limb: usize) -> &mut i64 {
        self.cover(limb, limb);
        &mut self.limbs[limb - self.base]
    }

    /// Stores limbs `from..=to` (zero where new).
    fn cover(&mut self, from: usize, to: usize) {
        if self.limbs.is_empty() {
            self.base = from;
            self.limbs.reserve_exact((to - from + 1).max(4));
            self.limbs.resize(to - from + 1, 0);
            return;
        }
        if from < self.base {
            self.limbs.splice(0..0, std::iter::repeat_n(0, self.base - from));
            self.base = from;
        }
        if to >= self.base + self.limbs.len() {
            self.limbs.resize(to - self.base + 1, 0);
        }
    }

    /// Adds `x` exactly.
    pub fn add(&mut self, x: f64) {
        self.add_signed(x, 1);
    }

    /// Subtracts `x` exactly (the inverse of [`ExactSum::add`]).
    pub fn sub(&mut self, x: f64) {
        self.add_signed(x, -1);
    }

    /// Adds the exact product `a · b` (both roundings of a two-product are kept).
    pub fn add_product(&mut self, a: f64, b: f64) {
        let p = a * b;
        if !p.is_finite() {
            self.add(p);
            return;
        }
        self.add(p);
        self.add(a.mul_add(b, -p));
    }

    fn add_signed(&mut self, x: f64, sign: i64) {
        if !x.is_finite() {
            if x.is_nan() {
                self.nan += sign;
            } else if x > 0.0 {
                self.pos_inf += sign;
            } else {
                self.neg_inf += sign;
            }
            return;
        }
        if x == 0.0 {
            return;
        }
        let bits = x.to_bits();
        let exponent = ((bits >> 52) & 0x7ff) as u32;
        let fraction = bits & ((1u64 << 52) - 1);
        let (mantissa, shift) = if exponent == 0 { (fraction, 0) } else { (fraction | (1u64 << 52), exponent - 1) };
        let negative = (x < 0.0) != (sign < 0);
        let index = (shift / DIGIT_BITS) as usize;
        let wide = (mantissa as u128) << (shift % DIGIT_BITS);
        let digits =
            [(wide & DIGIT_MASK as u128) as i64, ((wide >> 32) & DIGIT_MASK as u128) as i64, (wide >> 64) as i64];
        self.make_room(1);
        // The digits in use: at least one, as the mantissa is not zero.
        let first = digits.iter().position(|d| *d != 0).unwrap_or(0);
        let last = digits.iter().rposition(|d| *d != 0).unwrap_or(0);
        self.cover(index + first, index + last);
        for (offset, digit) in digits.into_iter().enumerate().take(last + 1).skip(first) {
            self.limbs[index + offset - self.base] += if negative { -digit } else { digit };
        }
        self.widen(index + first);
        self.widen(index + last);
    }

    /// Adds another partial sum: afterwards `self` is the exact sum of both.
    pub fn merge(&mut self, other: &ExactSum) {
        self.combine(other, 1);
    }

    /// Removes a partial sum previously merged in (or any partial sum): exact.
    pub fn retract(&mut self, other: &ExactSum) {
        self.combine(other, -1);
    }

    fn combine(&mut self, other: &ExactSum, sign: i64) {
        self.nan += sign * other.nan;
        self.pos_inf += sign * other.pos_inf;
        self.neg_inf += sign * other.neg_inf;
        if other.lo > other.hi {
            return;
        }
        if other.pending >= CARRY_LIMIT {
            let mut normalized = other.clone();
            normalized.propagate_carries();
            return self.combine_limbs(&normalized, sign);
        }
        self.combine_limbs(other, sign);
    }

    fn combine_limbs(&mut self, other: &ExactSum, sign: i64) {
        self.make_room(other.pending.max(1));
        self.cover(other.lo, other.hi);
        for limb in other.lo..=other.hi {
            let value = other.limb(limb);
            if value != 0 {
                self.limbs[limb - self.base] += sign * value;
                self.widen(limb);
            }
        }
    }

    fn widen(&mut self, limb: usize) {
        self.lo = self.lo.min(limb);
        self.hi = self.hi.max(limb);
    }

    fn make_room(&mut self, operations: u32) {
        if self.pending.saturating_add(operations) >= 2 * CARRY_LIMIT - 1 || self.pending >= CARRY_LIMIT {
            self.propagate_carries();
        }
        self.pending += operations;
    }

    /// Moves every limb's carry into the next limb, leaving the limbs below the top one in
    /// `[0, 2³²)` and the sign in the top one, which is left alone once within `(−2³², 2³²)`:
    /// so a negative sum does not ripple a carry of −1 up to the last limb.
    fn propagate_carries(&mut self) {
        if self.lo > self.hi {
            self.pending = 0;
            return;
        }
        let mut limb = self.lo;
        loop {
            let value = self.limb(limb);
            let top_fits = limb >= self.hi && value.unsigned_abs() < 1 << DIGIT_BITS;
            let carry = if top_fits { 0 } else { value >> DIGIT_BITS };
            if carry != 0 {
                *self.limb_mut(limb) -= carry << DIGIT_BITS;
                *self.limb_mut(limb + 1) += carry;
                self.hi = self.hi.max(limb + 1);
            } else if limb >= self.hi {
                break;
            }
            limb += 1;
        }
        self.pending = 1;
        while self.lo <= self.hi && self.limb(self.lo) == 0 {
            self.lo += 1;
        }
        while self.hi > self.lo && self.limb(self.hi) == 0 {
            self.hi -= 1;
        }
        if self.lo > self.hi {
            self.lo = LIMBS;
            self.hi = 0;
        }
    }

    /// Empties the sum (exactly zero, equal to a new one), keeping its storage for reuse.
    pub fn clear(&mut self) {
        self.limbs.fill(0);
        self.lo = LIMBS;
        self.hi = 0;
        self.pending = 0;
        self.nan = 0;
        self.pos_inf = 0;
        self.neg_inf = 0;
    }

    /// True when no value (finite or not) is left in the sum.
    pub fn is_zero(&self) -> bool {
        let mut copy = self.clone();
        copy.propagate_carries();
        copy.lo > copy.hi && self.nan == 0 && self.pos_inf == 0 && self.neg_inf == 0
    }

    /// The exact sum rounded once to the nearest double (ties to even).
    pub fn to_f64(&self) -> f64 {
        if self.nan != 0 || (self.pos_inf != 0 && self.neg_inf != 0) {
            return f64::NAN;
        }
        if self.pos_inf != 0 {
            return f64::INFINITY;
        }
        if self.neg_inf != 0 {
            return f64::NEG_INFINITY;
        }
        if self.lo > self.hi {
            return 0.0;
        }
        if let Some(value) = self.round_narrow() {
            return value;
        }
        let mut magnitude = self.clone();
        magnitude.nan = 0;
        magnitude.propagate_carries();
        if magnitude.lo > magnitude.hi {
            return 0.0;
        }
        // After carry propagation every limb but the top one is a digit in [0, 2^32), so the top
        // limb alone carries the sign.
        let negative = magnitude.limb(magnitude.hi) < 0;
        if negative {
            for limb in magnitude.lo..=magnitude.hi {
                *magnitude.limb_mut(limb) = -magnitude.limb(limb);
            }
            magnitude.propagate_carries();
        }
        let value = magnitude.round_positive();
        if negative { -value } else { value }
    }

    /// The common case, without carry propagation: when at most three limbs are in use and they
    /// sit high enough that the result is a normal double, the value is an i128 (each limb is
    /// below 2⁶² in magnitude, so three fit) times a power of two. Converting the i128 rounds
    /// once, to nearest even; scaling by a power of two is then exact.
    fn round_narrow(&self) -> Option<f64> {
        if self.hi - self.lo > 2 || self.lo < 2 {
            return None;
        }
        let mut total: i128 = 0;
        for limb in (self.lo..=self.hi).rev() {
            total = (total << DIGIT_BITS) + self.limb(limb) as i128;
        }
        if total == 0 {
            return Some(0.0);
        }
        // Units of 2^(32·lo − 1074); lo ≥ 2 keeps the scale at or above 2^-1010 (normal).
        let exponent = (self.lo as i32) * DIGIT_BITS as i32 - 1074;
        let scale = if exponent <= 1023 { f64::from_bits(((exponent + 1023) as u64) << 52) } else { return None };
        Some(i128_to_f64(total) * scale)
    }

    /// Rounds a normalized, non-negative, non-zero magnitude.
    fn round_positive(&self) -> f64 {
        let top = self.hi;
        let top_digit = self.limb(top) as u64;
        // Position of the highest set bit, in units of 2^-1074.
        let mut high_bit = top as i64 * DIGIT_BITS as i64 + 63 - top_digit.leading_zeros() as i64;
        if high_bit < 53 {
            // Fewer than 54 significant bits above 2^-1074: exactly representable.
            let units = self.bits(0, high_bit + 1);
            return units as f64 * f64::from_bits(1);
        }
        let mut mantissa = self.bits(high_bit - 52, 53);
        let guard = self.bits(high_bit - 53, 1) == 1;
        let sticky = self.any_below(high_bit - 53);
        if guard && (sticky || mantissa & 1 == 1) {
            mantissa += 1;
            if mantissa == 1 << 53 {
                mantissa >>= 1;
                high_bit += 1;
            }
        }
        let biased_exponent = high_bit - 51;
        if biased_exponent >= 0x7ff {
            return f64::INFINITY;
        }
        f64::from_bits(((biased_exponent as u64) << 52) | (mantissa & ((1 << 52) - 1)))
    }

    /// `count` (≤ 64) bits starting at bit `from` of a normalized magnitude.
    fn bits(&self, from: i64, count: i64) -> u64 {
        // Three limbs cover the at most 31 + 64 bits needed; only the top limb may exceed 32 bits,
        // and nothing lies above it.
        let first_limb = (from / DIGIT_BITS as i64) as usize;
        let mut out: u128 = 0;
        for (i, limb) in (first_limb..LIMBS).take(3).enumerate() {
            out |= (self.limb(limb) as u64 as u128) << (i as u32 * DIGIT_BITS);
        }
        let shifted = out >> (from % DIGIT_BITS as i64);
        (shifted & ((1u128 << count) - 1)) as u64
    }

    /// True when any bit strictly below bit `position` is set.
    fn any_below(&self, position: i64) -> bool {
        let limb = (position / DIGIT_BITS as i64) as usize;
        let within = position % DIGIT_BITS as i64;
        if (self.lo..limb).any(|below| self.limb(below) != 0) {
            return true;
        }
        within > 0 && (self.limb(limb) as u64) & ((1u64 << within) - 1) != 0
    }

    /// A compact encoding of the exact state, for changelogs and Arrow state columns.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut normalized = self.clone();
        normalized.propagate_carries();
        let mut out = Vec::with_capacity(32);
        for counter in [normalized.nan, normalized.pos_inf, normalized.neg_inf] {
            out.extend_from_slice(&counter.to_le_bytes());
        }
        if normalized.lo <= normalized.hi {
            out.push(normalized.lo as u8);
            out.push(normalized.hi as u8);
            for limb in normalized.lo..=normalized.hi {
                out.extend_from_slice(&normalized.limb(limb).to_le_bytes());
            }
        }
        out
    }

    /// Decodes [`ExactSum::to_bytes`]; `None` when the bytes are not such an encoding.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let word =
            |i: usize| -> Option<i64> { Some(i64::from_le_bytes(bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?)) };
        let mut sum = ExactSum { nan: word(0)?, pos_inf: word(1)?, neg_inf: word(2)?, ..Self::default() };
        if bytes.len() == 24 {
            return Some(sum);
        }
        let (lo, hi) = (*bytes.get(24)? as usize, *bytes.get(25)? as usize);
        if lo > hi || hi >= LIMBS || bytes.len() != 26 + (hi - lo + 1) * 8 {
            return None;
        }
        sum.cover(lo, hi);
        for (i, limb) in (lo..=hi).enumerate() {
            let at = 26 + i * 8;
            *sum.limb_mut(limb) = i64::from_le_bytes(bytes[at..at + 8].try_into().ok()?);
        }
        sum.lo = lo;
        sum.hi = hi;
        sum.pending = 1;
        Some(sum)
    }
}

/// `value` rounded to the nearest double (ties to even), as `value as f64` but without the
/// library routine for 128-bit integers: a value that fits 64 bits converts in one instruction,
/// and a wider one keeps its top 64 bits with every lower bit folded into the lowest (a sticky
/// bit, which sits below the rounding position and so rounds as the whole value would).
fn i128_to_f64(value: i128) -> f64 {
    if let Ok(narrow) = i64::try_from(value) {
        return narrow as f64;
    }
    let magnitude = value.unsigned_abs();
    let shift = 64 - magnitude.leading_zeros();
    let top = (magnitude >> shift) as u64 | u64::from(magnitude & ((1u128 << shift) - 1) != 0);
    let rounded = top as f64 * f64::from_bits(((shift + 1023) as u64) << 52);
    if value < 0 { -rounded } else { rounded }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_fixtures::reference::{round_units, units};
    use num_bigint::BigInt;
    use num_traits::Zero;
    use proptest::prelude::*;

    #[test]
    fn wide_integers_round_like_the_library_conversion() {
        let mut edges: Vec<i128> = vec![0, 1, -1, i128::MAX, i128::MIN, i128::MIN + 1];
        for bits in 54..127 {
            for delta in [-2i128, -1, 0, 1, 2] {
                let p = 1i128 << bits;
                edges.extend([p + delta, -(p + delta)]);
                // Halfway cases between two doubles, and just off them.
                let half = (1i128 << bits) + (1i128 << (bits - 53)) + delta;
                edges.extend([half, -half, half + (1i128 << (bits - 52)), -(half + (1i128 << (bits - 52)))]);
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let wide = ((next() as u128) << 64 | next() as u128) as i128;
            edges.push(wide >> (next() % 127));
        }
        for value in edges {
            assert_eq!(i128_to_f64(value).to_bits(), (value as f64).to_bits(), "{value}");
        }
    }

    fn exact(values: &[f64]) -> f64 {
        let mut sum = ExactSum::new();
        values.iter().for_each(|&v| sum.add(v));
        sum.to_f64()
    }

    fn reference(values: &[f64]) -> f64 {
        round_units(&values.iter().map(|&v| units(v)).sum())
    }

    #[test]
    fn classic_cancellation_cases() {
        assert_eq!(exact(&[1e100, 1.0, -1e100]), 1.0);
        assert_eq!(exact(&[0.1, 0.2, 0.3, -0.6]), reference(&[0.1, 0.2, 0.3, -0.6]));
        assert_eq!(exact(&[1.0, 1e-16, 1e-16]), 1.0000000000000002);
        assert_eq!(exact(&[f64::MAX, f64::MAX, -f64::MAX]), f64::MAX);
        assert_eq!(exact(&[f64::MAX, f64::MAX]), f64::INFINITY);
        assert_eq!(exact(&[-f64::MAX, -f64::MAX]), f64::NEG_INFINITY);
        assert_eq!(exact(&[f64::from_bits(1), f64::from_bits(1)]), f64::from_bits(2));
        assert_eq!(exact(&[]).to_bits(), 0.0f64.to_bits());
        assert_eq!(exact(&[-0.0]).to_bits(), 0.0f64.to_bits());
        assert_eq!(exact(&[-1.5, -2.25]), -3.75);
    }

    #[test]
    fn ties_round_to_even() {
        // 2^53 + 1 is halfway between 2^53 and 2^53 + 2: rounds to the even 2^53.
        assert_eq!(exact(&[9007199254740992.0, 1.0]), 9007199254740992.0);
        // 2^53 + 3 is halfway between 2^53 + 2 and 2^53 + 4: rounds to the even 2^53 + 4.
        assert_eq!(exact(&[9007199254740994.0, 1.0]), 9007199254740996.0);
        // Just above halfway rounds up.
        assert_eq!(exact(&[9007199254740992.0, 1.0, 1e-300]), 9007199254740994.0);
    }

    #[test]
    fn non_finite_values_follow_ieee() {
        assert!(exact(&[1.0, f64::NAN]).is_nan());
        assert!(exact(&[f64::INFINITY, f64::NEG_INFINITY]).is_nan());
        assert_eq!(exact(&[f64::INFINITY, 1.0]), f64::INFINITY);
        assert_eq!(exact(&[f64::NEG_INFINITY, -f64::MAX, -f64::MAX]), f64::NEG_INFINITY);
        let mut sum = ExactSum::new();
        sum.add(f64::NAN);
        sum.add(2.0);
        sum.sub(f64::NAN);
        assert_eq!(sum.to_f64(), 2.0);
    }

    #[test]
    fn many_additions_cross_the_carry_limit() {
        let mut sum = ExactSum::new();
        let mut other = ExactSum::new();
        for _ in 0..(CARRY_LIMIT as u64 / 1024 + 3) {
            sum.add(f64::MAX / 1e10);
            other.add(-f64::MAX / 1e10);
        }
        sum.pending = CARRY_LIMIT + 5;
        sum.merge(&other);
        assert_eq!(sum.to_f64(), 0.0);
    }

    #[test]
    fn sums_store_only_the_limbs_they_touch() {
        // Money amounts, ending negative: a few limbs, and normalizing does not ripple the sign
        // up to the last limb.
        let mut sum = ExactSum::new();
        for i in 0..10_000 {
            sum.add(if i % 3 == 0 { 12.34 } else { -9.99 });
        }
        assert!(sum.limbs.len() <= 4, "{} limbs", sum.limbs.len());
        assert_eq!(sum.to_f64(), reference(&[vec![12.34; 3334], vec![-9.99; 6666]].concat()));
        assert!(sum.to_bytes().len() <= 24 + 2 + 3 * 8, "{} bytes", sum.to_bytes().len());
        let back = ExactSum::from_bytes(&sum.to_bytes()).unwrap();
        assert_eq!(back.to_f64().to_bits(), sum.to_f64().to_bits());
        // A much smaller value extends the stored limbs downwards, a much larger one upwards.
        sum.add(1e-300);
        sum.add(-1e300);
        sum.add(1e300);
        let mut expected = vec![12.34; 3334];
        expected.extend(vec![-9.99; 6666]);
        expected.push(1e-300);
        assert_eq!(sum.to_f64().to_bits(), reference(&expected).to_bits());
        // Equal states compare equal whatever limbs each stored.
        let mut a = ExactSum::new();
        a.add(1.0);
        let mut b = ExactSum::new();
        b.add(1e-300);
        b.add(1.0);
        b.sub(1e-300);
        b.propagate_carries();
        a.propagate_carries();
        assert_eq!(a, b);
    }

    fn interesting_double() -> impl Strategy<Value = f64> {
        prop_oneof![
            4 => any::<f64>().prop_filter("finite", |v| v.is_finite()),
            4 => (-1e6f64..1e6).prop_map(|v| (v * 100.0).round() / 100.0),
            1 => (0u64..1u64 << 52).prop_map(f64::from_bits),
            1 => prop::sample::select(vec![0.0, -0.0, 1.0, -1.0, f64::MAX, -f64::MAX, f64::MIN_POSITIVE, 1e308, -1e308, 0.1]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn equals_the_exact_rational_rounded_once(values in prop::collection::vec(interesting_double(), 0..40)) {
            prop_assert_eq!(exact(&values).to_bits(), reference(&values).to_bits());
        }

        #[test]
        fn order_and_split_do_not_matter(values in prop::collection::vec(interesting_double(), 0..40), cut in 0usize..40, seed in any::<u64>()) {
            let cut = cut.min(values.len());
            let mut left = ExactSum::new();
            values[..cut].iter().for_each(|&v| left.add(v));
            let mut right = ExactSum::new();
            values[cut..].iter().rev().for_each(|&v| right.add(v));
            right.merge(&left);
            let mut shuffled = values.clone();
            let n = shuffled.len();
            for i in 0..n {
                let j = (seed.wrapping_mul(i as u64 + 7) % n as u64) as usize;
                shuffled.swap(i, j);
            }
            prop_assert_eq!(right.to_f64().to_bits(), exact(&shuffled).to_bits());
        }

        #[test]
        fn retract_undoes_merge(a in prop::collection::vec(interesting_double(), 0..20), b in prop::collection::vec(interesting_double(), 0..20)) {
            let mut left = ExactSum::new();
            a.iter().for_each(|&v| left.add(v));
            let mut right = ExactSum::new();
            b.iter().for_each(|&v| right.add(v));
            let mut both = left.clone();
            both.merge(&right);
            both.retract(&right);
            prop_assert_eq!(both.to_f64().to_bits(), left.to_f64().to_bits());
            let back = ExactSum::from_bytes(&both.to_bytes()).unwrap();
            prop_assert_eq!(back.to_f64().to_bits(), left.to_f64().to_bits());
        }

        #[test]
        fn products_are_exact(a in -1e150f64..1e150, b in -1e150f64..1e150) {
            let product = units(a) * units(b);
            // Only products whose exact value is a whole number of 2^-1074 units are exact doubles pairs.
            prop_assume!(&product % (BigInt::from(1u8) << 1074usize) == BigInt::zero());
            let mut sum = ExactSum::new();
            sum.add_product(a, b);
            let expected = product >> 1074usize;
            prop_assert_eq!(sum.to_f64().to_bits(), round_units(&expected).to_bits());
        }
    }
}
