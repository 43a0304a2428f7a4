//! A single-pass decoder for the ingest body, `{"embeddings":[{"id","embedding_type",
//! "embedding","metadata"?}, ...]}`, that gives the same [`RawItem`]s as the serde path
//! ([`super::parse_batch_serde`]) at about twice its speed.
//!
//! Why it exists: with serde_json, turning decimal text into floats is most of the cost
//! of an ingest request. Here vector elements go straight from the body into a `Vec<f32>`
//! with no `Value` and no allocation per number: digits are read eight at a time, and the
//! value is one `f64` multiplication whenever that provably gives the correctly rounded
//! result (see `f32_from_parts`); any other number goes through `fast-float2`.
//!
//! What it accepts and rejects is serde_json's, case by case, so that a body gets the
//! same answer whichever path reads it:
//! - Any syntax error fails the whole request: trailing bytes, a missing comma, a bad
//!   literal, an unterminated string, a raw control character in a string, a number that
//!   is not JSON (`01`, `1.`, `.5`, `+1`), invalid UTF-8 in a string that is kept.
//! - Like serde_json, strings that are skipped (values of unknown keys, the insides of a
//!   wrong-typed field) are checked for syntax but not for UTF-8 or paired surrogates;
//!   strings that are kept or compared (keys, ids, types) are checked fully.
//! - A field with the wrong JSON type is recorded in the [`RawItem`], so validation
//!   rejects that item alone, with the same code and reason as the serde path.
//! - Unknown keys are skipped, at the top level and in items; the body may also be the
//!   sequence form serde accepts for a struct, `[[item, ...]]`.
//! - `metadata` objects, rare and small, are handed to serde_json once their extent is
//!   known, so their `Value`s are exactly serde's.
//!
//! Two deliberate differences, both inside embedding arrays only:
//! - `NaN`, `Infinity` and `-Infinity` (as Python's `json.dumps` writes them) are
//!   accepted and become non-finite elements, which validation rejects as `non_finite`
//!   for that item; serde_json fails the whole request on them.
//! - A number too large for an `f64` (`1e400`) becomes an infinity, again rejected as
//!   `non_finite`; serde_json fails the whole request. Elsewhere (ids, metadata, ...)
//!   such a number fails the request here too, as it does in serde_json.
//!
//! Rounding: elements are rounded once to the nearest `f64` and then to `f32` (`as f32`),
//! which is what the serde path does. Parsing straight to `f32` (fast-float2 can, and
//! rounds correctly) would round once and be marginally more accurate, but would differ
//! from the serde path on the rare decimals within half an `f64` ulp of a point halfway
//! between two `f32`s. (serde_json rounds correctly to `f64` only with its
//! `float_roundtrip` feature, which the tests turn on; without it, it can be an `f64` ulp
//! off, so on such near-halfway inputs the serde path then differs from this decoder,
//! which is the correctly rounded one.)
//!
//! Layout: `scan` walks the JSON (structure, strings, skipped values, errors) and
//! hands each number to `float`, which checks its grammar and rounds it to `f32`.

mod float;
mod scan;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::fmt;

use super::RawItem;
use crate::model::Schema;
use scan::Scanner;

/// Why a body could not be decoded: where, and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    offset: usize,
    expected: Cow<'static, str>,
    found: Found,
}

/// What stood at the error's offset, when that helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Byte(u8),
    End,
    Unstated,
}

impl DecodeError {
    /// Byte offset into the body where decoding stopped.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// What the decoder expected at [`DecodeError::offset`].
    pub fn expected(&self) -> &str {
        &self.expected
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "invalid JSON at byte {}: expected {}", self.offset, self.expected)?;
        match self.found {
            Found::Byte(b) if b.is_ascii_graphic() => write!(f, ", found `{}`", b as char),
            Found::Byte(b) => write!(f, ", found byte 0x{b:02x}"),
            Found::End => f.write_str(", found the end of the body"),
            Found::Unstated => Ok(()),
        }
    }
}

impl std::error::Error for DecodeError {}

type Result<T> = std::result::Result<T, DecodeError>;

/// Decodes a request body into its items, unvalidated; `Err` when the JSON is unusable.
pub fn decode_items(body: &[u8], schema: &Schema) -> Result<Vec<RawItem>> {
    let mut scanner = Scanner::new(body, schema);
    let items = scanner.request()?;
    scanner.end()?;
    Ok(items)
}
