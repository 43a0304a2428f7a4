//! The numbers of the decoder: the JSON number grammar, digits read eight at a time, and
//! rounding to `f32` with one `f64` multiplication when that is provably the correctly
//! rounded result (`f32_from_parts`), fast-float2 otherwise, serde_json for absurdly long
//! numbers. Everything here works on byte offsets and knows nothing of the JSON around.

/// Past this many bytes, a number's exponent may saturate (in `fast-float2` and in our
/// scan), so such absurd numbers are left to serde_json, which tracks it exactly.
const LONG_NUMBER: usize = 4096;

/// A JSON number as read by [`scan_decimal`]: `±mantissa × 10^exponent`, exact when it
/// has at most 19 significant digits.
pub(super) struct Decimal {
    pub(super) end: usize,
    negative: bool,
    mantissa: u64,
    exponent: i64,
    /// Significant digits: leading zeros do not count, trailing ones do.
    digits: usize,
}

/// Exact powers of ten as `f64`s (5^22 < 2^53).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// Negative powers of ten, each the nearest `f64` (none is exact but 1).
const NEG_POW10: [f64; 45] = [
    1e-0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13, 1e-14, 1e-15, 1e-16, 1e-17,
    1e-18, 1e-19, 1e-20, 1e-21, 1e-22, 1e-23, 1e-24, 1e-25, 1e-26, 1e-27, 1e-28, 1e-29, 1e-30, 1e-31, 1e-32, 1e-33,
    1e-34, 1e-35, 1e-36, 1e-37, 1e-38, 1e-39, 1e-40, 1e-41, 1e-42, 1e-43, 1e-44,
];

impl Decimal {
    /// The number, which starts at `start` in `buf`, rounded to the nearest `f64` and
    /// then to `f32`, like the serde path (see the module doc).
    #[inline(always)]
    pub(super) fn to_f32(&self, buf: &[u8], start: usize) -> f32 {
        // A long number may have saturated its exponent in the scan.
        if self.end - start <= LONG_NUMBER {
            if let Some(x) = self.quick_f32() {
                return x;
            }
        }
        slow_f32(&buf[start..self.end])
    }

    /// The number as `(nearest f64) as f32` when [`f32_from_parts`] can be sure of it.
    #[inline(always)]
    pub(super) fn quick_f32(&self) -> Option<f32> {
        if self.digits > 19 {
            return None; // the mantissa wrapped
        }
        f32_from_parts(self.negative, self.mantissa, self.exponent)
    }
}

/// `±mantissa × 10^exponent` as `(nearest f64) as f32`, without a full parse, when that
/// is cheap and certain; `None` sends the number to fast-float2.
///
/// Why the result is the same: `mantissa × 10^exponent` computed as one product of the
/// mantissa and a power of ten, each rounded to `f64`, has three roundings, so it is
/// within 4 `f64` ulps of the nearest `f64`. The two round to the same `f32` unless a
/// point halfway between two `f32`s lies between them, so the product is used only when
/// it is more than 64 ulps from any such point (and a normal `f32`). Near such a point,
/// with at most 53 bits of mantissa and |exponent| <= 22, one division or multiplication
/// of exact operands *is* the nearest `f64` (Clinger's fast path). (The product, not the
/// division, is the common case: a division costs several times as much.)
#[inline(always)]
fn f32_from_parts(negative: bool, mantissa: u64, exponent: i64) -> Option<f32> {
    // Through `i64` when it fits: one instruction instead of several.
    let m = if mantissa <= i64::MAX as u64 { mantissa as i64 as f64 } else { mantissa as f64 };
    let approx = match exponent {
        _ if mantissa == 0 => 0.0,
        e @ 0..=22 => m * POW10[e as usize],
        e @ -44..=-1 => m * NEG_POW10[-e as usize],
        _ => return None,
    };
    let x = if mantissa == 0 || clear_of_f32_midpoints(approx) {
        approx
    } else if mantissa <= 1 << 53 && (-22..=22).contains(&exponent) {
        scale(m, exponent)
    } else {
        return None;
    };
    let sign = u32::from(negative) << 31;
    Some(f32::from_bits((x as f32).to_bits() | sign))
}

/// Bytes [`common_number`] reads at once: room for any number it takes, and 8 more.
pub(super) const WINDOW: usize = 48;

/// The common shape of an element, `-?int(.frac)?(e[+-]?exp)?` with at most 7 integer
/// digits, 23 fraction digits and 4 exponent digits, read from a fixed window with few
/// checks. `None` for anything else, every error included, and near the end of the body:
/// [`scan_decimal`] then reads it (and so is the one to say what is wrong).
#[inline(always)]
pub(super) fn common_number(buf: &[u8], start: usize) -> Option<(f32, usize)> {
    let w: &[u8; WINDOW] = buf.get(start..start + WINDOW)?.try_into().ok()?;
    let negative = w[0] == b'-';
    let mut k = usize::from(negative);
    let (mut mantissa, n) = match (w[k].wrapping_sub(b'0'), w[k + 1].is_ascii_digit()) {
        // Embeddings are mostly within (-10, 10): one integer digit.
        (digit @ 0..=9, false) => (u64::from(digit), 1),
        _ => digit_run(w, k)?,
    };
    // No digit, `0` followed by digits, or too many digits.
    if n == 0 || n == 8 || (w[k] == b'0' && n > 1) {
        return None;
    }
    k += n;
    let mut exponent = 0i64;
    if w[k] == b'.' {
        k += 1;
        let fraction = k;
        loop {
            let (value, n) = digit_run16(w, k)?;
            mantissa = mantissa.checked_mul(*POW10_U64.get(n)?)?.checked_add(value)?;
            k += n;
            if n < 16 || k - fraction > 16 {
                break;
            }
        }
        // No fraction digit, or more than fit the window.
        if k == fraction || k - fraction > 23 {
            return None;
        }
        exponent = -((k - fraction) as i64);
    }
    if w[k] | 0x20 == b'e' {
        k += 1;
        let minus = w[k] == b'-';
        k += usize::from(minus || w[k] == b'+');
        let (value, n) = digit_run(w, k)?;
        if n == 0 || n > 4 {
            return None;
        }
        k += n;
        exponent += if minus { -(value as i64) } else { value as i64 };
    }
    Some((f32_from_parts(negative, mantissa, exponent)?, start + k))
}

/// Whether the element at `i` is a number (and not `-Infinity`).
#[inline(always)]
pub(super) fn starts_number(buf: &[u8], i: usize) -> bool {
    match buf.get(i) {
        Some(b'0'..=b'9') => true,
        Some(b'-') => buf.get(i + 1) != Some(&b'I'),
        _ => false,
    }
}

#[cold]
#[inline(never)]
fn slow_f32(text: &[u8]) -> f32 {
    parse_f64(text) as f32
}

/// Clinger's fast path: exact when `m` is exact and |exponent| <= 22.
fn scale(m: f64, exponent: i64) -> f64 {
    if exponent < 0 {
        m / POW10[-exponent as usize]
    } else {
        m * POW10[exponent as usize]
    }
}

/// Whether `a` is a normal `f32` magnitude more than 64 `f64` ulps from a point halfway
/// between two `f32`s. Such points have the 29 bits an `f32` drops equal to `1 << 28`.
#[inline]
fn clear_of_f32_midpoints(a: f64) -> bool {
    // For a non-negative `a`, its bits order like its value.
    const LOW: u64 = f64::to_bits(f32::MIN_POSITIVE as f64);
    const HIGH: u64 = f64::to_bits(f32::MAX as f64);
    let bits = a.to_bits();
    let normal = bits.wrapping_sub(LOW) < HIGH - LOW;
    let dropped = bits & ((1 << 29) - 1);
    normal && dropped.abs_diff(1 << 28) > 64
}

/// Checks the JSON number grammar from `start` and reads its digits on the way; `Err`
/// has the offset of the offending byte. Stricter than fast-float2, which takes `+1`,
/// `.5`, `1.` and `01`.
#[inline(always)]
pub(super) fn scan_decimal(buf: &[u8], start: usize) -> std::result::Result<Decimal, usize> {
    let mut i = start;
    let negative = buf.get(i) == Some(&b'-');
    i += usize::from(negative);
    let mut mantissa = 0u64;
    let mut digits = 0;
    match buf.get(i) {
        Some(b'0') => {
            i += 1;
            if matches!(buf.get(i), Some(b'0'..=b'9')) {
                return Err(i);
            }
        }
        Some(b'1'..=b'9') => (i, digits) = accumulate(buf, i, &mut mantissa),
        _ => return Err(i),
    }
    let mut exponent = 0i64;
    if buf.get(i) == Some(&b'.') {
        let fraction = i + 1;
        i = fraction;
        if mantissa == 0 {
            while buf.get(i) == Some(&b'0') {
                i += 1;
            }
        }
        let (end, more) = accumulate(buf, i, &mut mantissa);
        if end == fraction {
            return Err(end);
        }
        (i, digits) = (end, digits + more);
        exponent = -((end - fraction) as i64);
    }
    if matches!(buf.get(i), Some(b'e' | b'E')) {
        i += 1;
        let minus = buf.get(i) == Some(&b'-');
        i += usize::from(matches!(buf.get(i), Some(b'+' | b'-')));
        let mut explicit = 0i64;
        let digits_at = i;
        while let Some(&d @ b'0'..=b'9') = buf.get(i) {
            // Saturates: past 10^7 the value is 0 or infinite whatever the mantissa says.
            explicit = (explicit * 10 + i64::from(d - b'0')).min(10_000_000);
            i += 1;
        }
        if i == digits_at {
            return Err(i);
        }
        exponent += if minus { -explicit } else { explicit };
    }
    Ok(Decimal { end: i, negative, mantissa, exponent, digits })
}

/// Reads digits from `i` into `mantissa` (wrapping past 19); returns the end and count.
/// Up to eight at a time (embeddings are printed with 7 to 17 digits), one at a time in
/// the last bytes of the body.
#[inline(always)]
fn accumulate(buf: &[u8], mut i: usize, mantissa: &mut u64) -> (usize, usize) {
    let start = i;
    while let Some((value, n)) = digit_run(buf, i) {
        *mantissa = mantissa.wrapping_mul(POW10_U64[n]).wrapping_add(value);
        i += n;
        if n < 8 {
            return (i, i - start);
        }
    }
    while let Some(&d @ b'0'..=b'9') = buf.get(i) {
        *mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
        i += 1;
    }
    (i, i - start)
}

const POW10_U64: [u64; 17] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
    100_000_000_000,
    1_000_000_000_000,
    10_000_000_000_000,
    100_000_000_000_000,
    1_000_000_000_000_000,
    10_000_000_000_000_000,
];

/// The run of ASCII digits (at most eight) at the start of the eight bytes at `i`: its
/// value and length. SWAR, as in fast-float, with the first non-digit found by mask.
#[inline(always)]
pub(super) fn digit_run(buf: &[u8], i: usize) -> Option<(u64, usize)> {
    let v = load8(buf, i)?;
    let n = digits_in(v);
    Some((digits_value(v, n), n))
}

/// Like [`digit_run`], up to sixteen digits: most fractions in embeddings fit.
#[inline(always)]
fn digit_run16(buf: &[u8], i: usize) -> Option<(u64, usize)> {
    let low = load8(buf, i)?;
    let n = digits_in(low);
    if n < 8 {
        return Some((digits_value(low, n), n));
    }
    let high = load8(buf, i + 8)?;
    let m = digits_in(high);
    Some((digits_value(low, 8) * POW10_U64[m] + digits_value(high, m), 8 + m))
}

#[inline(always)]
fn load8(buf: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(i..i + 8)?.try_into().ok()?))
}

/// How many of the eight bytes in `v`, from the first in the text (the lowest), are
/// ASCII digits before the first one that is not.
#[inline(always)]
fn digits_in(v: u64) -> usize {
    // A digit byte has high nibble 3 and stays so when 6 is added. Carries from adding
    // only start at bytes >= 0xFA, non-digits, so the bytes before the first non-digit
    // are judged correctly.
    const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    const THREES: u64 = 0x3030_3030_3030_3030;
    let not_digit = ((v & HIGH) ^ THREES) | ((v.wrapping_add(0x0606_0606_0606_0606) & HIGH) ^ THREES);
    (not_digit.trailing_zeros() / 8) as usize
}

/// The value of the first `n` bytes of `v`, which are digits.
#[inline(always)]
fn digits_value(v: u64, n: usize) -> u64 {
    if n == 0 {
        return 0;
    }
    // Digits to values (borrows only start at non-digits, past the run), then the run
    // moved to the high end, after zeros that act as leading zeros.
    let v = v.wrapping_sub(0x3030_3030_3030_3030) << (8 * (8 - n));
    let v = v * 10 + (v >> 8); // pairs of digits, in every other byte
    let low = (v & 0x0000_00FF_0000_00FF).wrapping_mul(0x000F_4240_0000_0064);
    let high = ((v >> 16) & 0x0000_00FF_0000_00FF).wrapping_mul(0x0000_2710_0000_0001);
    u64::from((low.wrapping_add(high) >> 32) as u32)
}

/// The grammar check alone, for numbers that are skipped or not in a vector.
pub(super) fn scan_number(buf: &[u8], start: usize) -> std::result::Result<usize, usize> {
    scan_decimal(buf, start).map(|d| d.end)
}

/// A checked JSON number rounded once to the nearest `f64` (infinite past `f64::MAX`).
pub(super) fn parse_f64(text: &[u8]) -> f64 {
    if text.len() > LONG_NUMBER {
        return long_number(text);
    }
    // Every JSON number is one fast-float2 takes; it cannot fail here.
    fast_float2::parse(text).unwrap_or(f64::NAN)
}

/// A number too long for fast-float2's saturating exponent: serde_json parses it (its
/// only possible error, the grammar being checked, is an overflow: an infinity here).
#[cold]
fn long_number(text: &[u8]) -> f64 {
    match serde_json::from_slice::<f64>(text) {
        Ok(x) => x,
        Err(_) if text[0] == b'-' => f64::NEG_INFINITY,
        Err(_) => f64::INFINITY,
    }
}
