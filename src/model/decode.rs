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

use std::borrow::Cow;
use std::fmt;

use super::RawItem;
use crate::model::{Metadata, Schema};

/// serde_json refuses to nest deeper than 127 containers. In the serde path a metadata
/// object is itself at depth 4 (body, `embeddings`, item, metadata), so the deepest
/// container it accepts inside metadata is 124 levels down, counting metadata as 1.
const METADATA_MAX_DEPTH: usize = 124;

/// Past this many bytes, a number's exponent may saturate (in `fast-float2` and in our
/// scan), so such absurd numbers are left to serde_json, which tracks it exactly.
const LONG_NUMBER: usize = 4096;

/// A vector never gets more capacity up front than this, whatever the config says.
const MAX_RESERVE: usize = 1 << 16;

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

/// The item keys the decoder knows, in the order of [`Scanner::item`]'s match.
const ITEM_KEYS: &[&[u8]] = &[b"id", b"embedding_type", b"embedding", b"metadata"];

struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
    schema: &'a Schema,
    /// Capacity for a vector whose type is not known yet: the largest configured dims.
    max_dims: usize,
    /// Decoded keys; kept to reuse its allocation.
    scratch: Vec<u8>,
    /// Open containers while skipping a value (`true` for an object); a heap stack
    /// because, as in serde_json, skipped values have no depth limit.
    stack: Vec<bool>,
    /// The deepest `stack` got during the last skip.
    max_depth: usize,
}

impl<'a> Scanner<'a> {
    fn new(buf: &'a [u8], schema: &'a Schema) -> Self {
        let max_dims = schema.parts().iter().map(|p| p.dims).max().unwrap_or(0).min(MAX_RESERVE);
        Scanner { buf, pos: 0, schema, max_dims, scratch: Vec::new(), stack: Vec::new(), max_depth: 0 }
    }

    // ---- errors -------------------------------------------------------------------------

    /// A syntax error at the current position.
    #[cold]
    fn error(&self, expected: impl Into<Cow<'static, str>>) -> DecodeError {
        self.error_at(self.pos, expected)
    }

    #[cold]
    fn error_at(&self, offset: usize, expected: impl Into<Cow<'static, str>>) -> DecodeError {
        let found = self.buf.get(offset).map_or(Found::End, |&b| Found::Byte(b));
        DecodeError { offset, expected: expected.into(), found }
    }

    /// An error about the body's shape rather than a byte.
    #[cold]
    fn shape_error(&self, offset: usize, expected: impl Into<Cow<'static, str>>) -> DecodeError {
        DecodeError { offset, expected: expected.into(), found: Found::Unstated }
    }

    // ---- tokens -------------------------------------------------------------------------

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// Skips JSON whitespace and returns the next byte.
    #[inline]
    fn peek_ws(&mut self) -> Option<u8> {
        self.pos = skip_ws(self.buf, self.pos);
        self.peek()
    }

    /// Consumes `word` (a literal such as `true`) at the current position.
    fn literal(&mut self, word: &'static [u8]) -> Result<()> {
        for &expected in word {
            if self.peek() != Some(expected) {
                return Err(self.error(literal_name(word)));
            }
            self.pos += 1;
        }
        Ok(())
    }

    /// Only whitespace may follow the request.
    fn end(&mut self) -> Result<()> {
        match self.peek_ws() {
            None => Ok(()),
            Some(_) => Err(self.error("the end of the body")),
        }
    }

    // ---- containers ---------------------------------------------------------------------
    // Just after `[` or `{`, and after each element, these say whether another element
    // follows, with serde_json's rules for commas.

    #[inline]
    fn first_element(&mut self) -> Result<bool> {
        if self.peek_ws() == Some(b']') {
            self.pos += 1;
            return Ok(false);
        }
        Ok(true)
    }

    #[inline]
    fn next_element(&mut self) -> Result<bool> {
        match self.peek_ws() {
            Some(b',') => {
                self.pos += 1;
                match self.peek_ws() {
                    Some(b']') => Err(self.error("a value after `,`")),
                    _ => Ok(true),
                }
            }
            Some(b']') => {
                self.pos += 1;
                Ok(false)
            }
            _ => Err(self.error("`,` or `]`")),
        }
    }

    fn first_key(&mut self) -> Result<bool> {
        match self.peek_ws() {
            Some(b'}') => {
                self.pos += 1;
                Ok(false)
            }
            Some(b'"') => Ok(true),
            _ => Err(self.error("a string key or `}`")),
        }
    }

    fn next_key(&mut self) -> Result<bool> {
        match self.peek_ws() {
            Some(b',') => {
                self.pos += 1;
                match self.peek_ws() {
                    Some(b'"') => Ok(true),
                    _ => Err(self.error("a string key after `,`")),
                }
            }
            Some(b'}') => {
                self.pos += 1;
                Ok(false)
            }
            _ => Err(self.error("`,` or `}`")),
        }
    }

    /// Decodes a key (at a `"`) and its colon; returns its index in `known`, if any.
    fn key(&mut self, known: &[&[u8]]) -> Result<Option<usize>> {
        let mut key = std::mem::take(&mut self.scratch);
        key.clear();
        let start = self.pos;
        let decoded = self.string_into(&mut key);
        let found = decoded.and_then(|()| match std::str::from_utf8(&key) {
            Ok(_) => Ok(known.iter().position(|k| *k == key.as_slice())),
            Err(_) => Err(self.error_at(start, "a key in valid UTF-8")),
        });
        self.scratch = key;
        let found = found?;
        if self.peek_ws() != Some(b':') {
            return Err(self.error("`:`"));
        }
        self.pos += 1;
        Ok(found)
    }

    // ---- the request --------------------------------------------------------------------

    fn request(&mut self) -> Result<Vec<RawItem>> {
        match self.peek_ws() {
            Some(b'{') => self.request_object(),
            // serde accepts a struct as a sequence of its fields: `[[item, ...]]`.
            Some(b'[') => self.request_sequence(),
            _ => Err(self.error("an object with an `embeddings` array")),
        }
    }

    fn request_object(&mut self) -> Result<Vec<RawItem>> {
        self.pos += 1;
        let mut items = None;
        let mut more = self.first_key()?;
        while more {
            let key_at = self.pos;
            if self.key(&[b"embeddings"])?.is_some() {
                if items.is_some() {
                    return Err(self.shape_error(key_at, "`embeddings` only once"));
                }
                items = Some(self.items()?);
            } else {
                self.skip_value()?;
            }
            more = self.next_key()?;
        }
        items.ok_or_else(|| self.shape_error(self.pos - 1, "an `embeddings` field"))
    }

    fn request_sequence(&mut self) -> Result<Vec<RawItem>> {
        self.pos += 1;
        if !self.first_element()? {
            return Err(self.shape_error(self.pos - 1, "the `embeddings` array as the first element"));
        }
        let items = self.items()?;
        match self.peek_ws() {
            Some(b']') => {
                self.pos += 1;
                Ok(items)
            }
            _ => Err(self.error("`]` after the `embeddings` array")),
        }
    }

    fn items(&mut self) -> Result<Vec<RawItem>> {
        if self.peek_ws() != Some(b'[') {
            return Err(self.error("an array of embeddings"));
        }
        self.pos += 1;
        let mut items = Vec::new();
        let mut more = self.first_element()?;
        while more {
            items.push(self.item()?);
            more = self.next_element()?;
        }
        Ok(items)
    }

    /// One item; later duplicates of a key win, as in the serde path.
    fn item(&mut self) -> Result<RawItem> {
        if self.peek_ws() != Some(b'{') {
            return Err(self.error("an embedding object"));
        }
        self.pos += 1;
        let mut item = RawItem::default();
        let mut more = self.first_key()?;
        while more {
            match self.key(ITEM_KEYS)? {
                Some(0) => item.id = Some(self.lenient_string()?),
                Some(1) => item.embedding_type = Some(self.lenient_string()?),
                Some(2) => {
                    let capacity = self.capacity_for(item.embedding_type.as_ref());
                    item.embedding = Some(self.embedding(capacity)?);
                }
                Some(3) => item.metadata = self.metadata()?,
                _ => self.skip_value()?,
            }
            more = self.next_key()?;
        }
        Ok(item)
    }

    /// The exact dims when the item's type came first and is known, else the largest.
    fn capacity_for(&self, type_name: Option<&std::result::Result<String, String>>) -> usize {
        let slot = type_name.and_then(|t| t.as_ref().ok()).and_then(|t| self.schema.slot_of(t));
        slot.map_or(self.max_dims, |s| self.schema.part(s).dims.min(MAX_RESERVE))
    }

    // ---- fields -------------------------------------------------------------------------

    /// A field that should be a string; any other value is described instead.
    fn lenient_string(&mut self) -> Result<std::result::Result<String, String>> {
        if self.peek_ws() == Some(b'"') {
            return Ok(Ok(self.owned_string()?));
        }
        Ok(Err(self.wrong_type()?.to_owned()))
    }

    /// `metadata`: an object, `null` (none), or a description of the wrong value.
    fn metadata(&mut self) -> Result<Option<std::result::Result<Metadata, String>>> {
        if self.peek_ws() == Some(b'{') {
            return Ok(Some(Ok(self.metadata_object()?)));
        }
        Ok(match self.wrong_type()? {
            "null" => None,
            what => Some(Err(what.to_owned())),
        })
    }

    /// Finds the object's extent with the skipper, then lets serde_json build the map.
    fn metadata_object(&mut self) -> Result<Metadata> {
        let start = self.pos;
        self.skip_value()?;
        if self.max_depth > METADATA_MAX_DEPTH {
            let expected = format!("`metadata` nested at most {METADATA_MAX_DEPTH} levels deep");
            return Err(self.shape_error(start, expected));
        }
        serde_json::from_slice(&self.buf[start..self.pos])
            .map_err(|e| self.shape_error(start, format!("a `metadata` object serde_json accepts ({e})")))
    }

    /// `embedding`: an array of numbers, or a description of the wrong value.
    fn embedding(&mut self, capacity: usize) -> Result<std::result::Result<Vec<f32>, String>> {
        if self.peek_ws() == Some(b'[') {
            return self.vector(capacity);
        }
        let what = self.wrong_type()?;
        Ok(Err(format!("`embedding` must be an array of numbers, got {what}")))
    }

    /// The elements go through [`Scanner::numbers_into`] while they are plain numbers,
    /// and one by one through [`Scanner::element`] otherwise. A wrong-typed element does
    /// not stop the scan (the rest must still be valid JSON); the first one is reported.
    fn vector(&mut self, capacity: usize) -> Result<std::result::Result<Vec<f32>, String>> {
        self.pos += 1;
        let mut out = Vec::with_capacity(capacity);
        let mut bad: Option<(usize, &'static str)> = None;
        let mut more = self.first_element()?;
        while more && !self.numbers_into(&mut out)? {
            match self.element()? {
                Ok(x) => out.push(x),
                Err(what) => {
                    bad.get_or_insert((out.len(), what));
                    out.push(0.0);
                }
            }
            more = self.next_element()?;
        }
        Ok(match bad {
            None => Ok(out),
            Some((at, what)) => Err(format!("`embedding[{at}]` is {what}, not a number")),
        })
    }

    /// The hot loop, from the start of an element: numbers and their separators, with
    /// the position kept in a register. `true` once it has consumed the closing `]`;
    /// `false` at an element that is not a plain number, left to [`Scanner::element`].
    #[inline]
    fn numbers_into(&mut self, out: &mut Vec<f32>) -> Result<bool> {
        let buf = self.buf;
        let mut i = self.pos;
        loop {
            i = skip_ws(buf, i);
            let (x, end) = match common_number(buf, i) {
                Some(found) => found,
                None if starts_number(buf, i) => {
                    let decimal = scan_decimal(buf, i).map_err(|at| self.error_at(at, "a digit"))?;
                    (decimal.to_f32(buf, i), decimal.end)
                }
                None => {
                    self.pos = i;
                    return Ok(false);
                }
            };
            out.push(x);
            i = skip_ws(buf, end);
            match buf.get(i) {
                Some(b',') => i += 1,
                Some(b']') => {
                    self.pos = i + 1;
                    return Ok(true);
                }
                _ => return Err(self.error_at(i, "`,` or `]`")),
            }
        }
    }

    /// One vector element (after whitespace) that is not a number (those are all taken
    /// by [`Scanner::numbers_into`]): a Python non-finite token, or whatever else,
    /// described.
    fn element(&mut self) -> Result<std::result::Result<f32, &'static str>> {
        match self.peek() {
            Some(b'-') if self.buf.get(self.pos + 1) == Some(&b'I') => {
                self.pos += 1;
                self.literal(b"Infinity")?;
                Ok(Ok(f32::NEG_INFINITY))
            }
            Some(b'I') => self.literal(b"Infinity").map(|()| Ok(f32::INFINITY)),
            Some(b'N') => self.literal(b"NaN").map(|()| Ok(f32::NAN)),
            _ => Ok(Err(self.wrong_type()?)),
        }
    }

    /// Consumes a value of the wrong type the way the serde path's visitors do, and says
    /// what it was: strings are decoded and checked, numbers must fit an `f64`, arrays
    /// and objects are skipped (an object's own keys are still checked).
    fn wrong_type(&mut self) -> Result<&'static str> {
        match self.peek_ws() {
            Some(b'"') => {
                self.owned_string()?;
                Ok("a string")
            }
            Some(b't') => self.literal(b"true").map(|()| "a boolean"),
            Some(b'f') => self.literal(b"false").map(|()| "a boolean"),
            Some(b'n') => self.literal(b"null").map(|()| "null"),
            Some(b'-' | b'0'..=b'9') => self.finite_number().map(|_| "a number"),
            Some(b'[') => self.drop_array().map(|()| "an array"),
            Some(b'{') => self.drop_object().map(|()| "an object"),
            _ => Err(self.error("a JSON value")),
        }
    }

    /// serde's `drop_seq`: every element skipped.
    fn drop_array(&mut self) -> Result<()> {
        self.pos += 1;
        let mut more = self.first_element()?;
        while more {
            self.skip_value()?;
            more = self.next_element()?;
        }
        Ok(())
    }

    /// serde's `drop_map`: keys decoded (so checked), values skipped.
    fn drop_object(&mut self) -> Result<()> {
        self.pos += 1;
        let mut more = self.first_key()?;
        while more {
            self.key(&[])?;
            self.skip_value()?;
            more = self.next_key()?;
        }
        Ok(())
    }

    // ---- numbers ------------------------------------------------------------------------

    /// The JSON number at the current position, rounded once to the nearest `f64`;
    /// infinite when its magnitude is too large.
    fn number(&mut self) -> Result<f64> {
        let start = self.pos;
        self.pos = scan_number(self.buf, start).map_err(|at| self.error_at(at, "a digit"))?;
        Ok(parse_f64(&self.buf[start..self.pos]))
    }

    /// A number outside a vector: like serde_json, too large a magnitude fails the body.
    fn finite_number(&mut self) -> Result<f64> {
        let start = self.pos;
        let x = self.number()?;
        if x.is_infinite() {
            return Err(self.shape_error(start, "a number within the range of a 64-bit float"));
        }
        Ok(x)
    }

    // ---- strings ------------------------------------------------------------------------

    /// A string that is kept: decoded, with surrogates paired and UTF-8 checked.
    fn owned_string(&mut self) -> Result<String> {
        let start = self.pos;
        let mut bytes = Vec::new();
        self.string_into(&mut bytes)?;
        String::from_utf8(bytes).map_err(|_| self.error_at(start, "a string in valid UTF-8"))
    }

    /// Decodes the string at the current `"` into `out`, without checking its UTF-8
    /// (escapes always produce valid UTF-8, so checking the result once is enough).
    fn string_into(&mut self, out: &mut Vec<u8>) -> Result<()> {
        self.pos += 1;
        loop {
            let run = string_run(&self.buf[self.pos..]);
            out.extend_from_slice(&self.buf[self.pos..self.pos + run]);
            self.pos += run;
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.pos += 1;
                    self.escape_into(out)?;
                }
                Some(_) => return Err(self.error("an escaped control character")),
                None => return Err(self.error("`\"` closing the string")),
            }
        }
    }

    fn escape_into(&mut self, out: &mut Vec<u8>) -> Result<()> {
        let decoded = match self.peek() {
            Some(b'"') => b'"',
            Some(b'\\') => b'\\',
            Some(b'/') => b'/',
            Some(b'b') => b'\x08',
            Some(b'f') => b'\x0c',
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'u') => {
                self.pos += 1;
                let c = self.unicode_escape()?;
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                return Ok(());
            }
            _ => return Err(self.error("an escape: one of \"\\/bfnrtu")),
        };
        self.pos += 1;
        out.push(decoded);
        Ok(())
    }

    /// `\uXXXX` (after the `u`), or a surrogate pair `\uD8xx\uDCxx`; lone surrogates are
    /// errors, as in serde_json's strings.
    fn unicode_escape(&mut self) -> Result<char> {
        let start = self.pos;
        let lead = self.hex4()?;
        let code = match lead {
            0xDC00..=0xDFFF => return Err(self.error_at(start, "a leading surrogate before a trailing one")),
            0xD800..=0xDBFF => {
                if self.buf.get(self.pos..self.pos + 2) != Some(b"\\u") {
                    return Err(self.error("`\\u` and a trailing surrogate"));
                }
                self.pos += 2;
                let trail_at = self.pos;
                let trail = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&trail) {
                    return Err(self.error_at(trail_at, "a trailing surrogate"));
                }
                0x1_0000 + ((u32::from(lead) - 0xD800) << 10 | (u32::from(trail) - 0xDC00))
            }
            _ => u32::from(lead),
        };
        Ok(char::from_u32(code).expect("surrogates are handled above"))
    }

    fn hex4(&mut self) -> Result<u16> {
        let mut value = 0u16;
        for _ in 0..4 {
            let digit = self.peek().and_then(|b| (b as char).to_digit(16));
            let Some(digit) = digit else {
                return Err(self.error("a hex digit"));
            };
            value = value << 4 | digit as u16;
            self.pos += 1;
        }
        Ok(value)
    }

    // ---- skipping -----------------------------------------------------------------------

    /// Skips one value the way serde_json's `IgnoredAny` does: syntax is checked, strings
    /// are not decoded (so neither UTF-8 nor surrogates are checked), numbers are not
    /// computed, nesting is unlimited. Records the depth reached in `max_depth`.
    fn skip_value(&mut self) -> Result<()> {
        self.stack.clear();
        self.max_depth = 0;
        loop {
            if self.skip_scalar_or_open()? && !self.close_containers()? {
                return Ok(());
            }
        }
    }

    /// Skips a scalar or an empty container (`true`: a value is complete), or opens a
    /// container, up to its first value (`false`).
    fn skip_scalar_or_open(&mut self) -> Result<bool> {
        match self.peek_ws() {
            Some(b'{') => {
                self.pos += 1;
                self.open(true);
                if self.peek_ws() == Some(b'}') {
                    self.pos += 1;
                    self.stack.pop();
                    return Ok(true);
                }
                self.skip_key()?;
                return Ok(false);
            }
            Some(b'[') => {
                self.pos += 1;
                self.open(false);
                if self.peek_ws() == Some(b']') {
                    self.pos += 1;
                    self.stack.pop();
                    return Ok(true);
                }
                return Ok(false);
            }
            Some(b'"') => self.skip_string()?,
            Some(b't') => self.literal(b"true")?,
            Some(b'f') => self.literal(b"false")?,
            Some(b'n') => self.literal(b"null")?,
            Some(b'-' | b'0'..=b'9') => {
                self.pos = scan_number(self.buf, self.pos).map_err(|at| self.error_at(at, "a digit"))?;
            }
            _ => return Err(self.error("a JSON value")),
        }
        Ok(true)
    }

    fn open(&mut self, object: bool) {
        self.stack.push(object);
        self.max_depth = self.max_depth.max(self.stack.len());
    }

    /// After a complete value: closes the containers that end here, and says whether
    /// another value follows (`true`) or the outermost value is complete (`false`).
    fn close_containers(&mut self) -> Result<bool> {
        while let Some(&object) = self.stack.last() {
            match self.peek_ws() {
                Some(b',') => {
                    self.pos += 1;
                    if object {
                        self.skip_key()?;
                    }
                    return Ok(true);
                }
                Some(b'}') if object => self.pos += 1,
                Some(b']') if !object => self.pos += 1,
                _ if object => return Err(self.error("`,` or `}`")),
                _ => return Err(self.error("`,` or `]`")),
            }
            self.stack.pop();
        }
        Ok(false)
    }

    fn skip_key(&mut self) -> Result<()> {
        if self.peek_ws() != Some(b'"') {
            return Err(self.error("a string key"));
        }
        self.skip_string()?;
        if self.peek_ws() != Some(b':') {
            return Err(self.error("`:`"));
        }
        self.pos += 1;
        Ok(())
    }

    /// Skips the string at the current `"`: escapes must be well formed, raw control
    /// characters are refused, anything else goes.
    fn skip_string(&mut self) -> Result<()> {
        self.pos += 1;
        loop {
            self.pos += string_run(&self.buf[self.pos..]);
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.pos += 1;
                    self.skip_escape()?;
                }
                Some(_) => return Err(self.error("an escaped control character")),
                None => return Err(self.error("`\"` closing the string")),
            }
        }
    }

    fn skip_escape(&mut self) -> Result<()> {
        match self.peek() {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                self.pos += 1;
                Ok(())
            }
            Some(b'u') => {
                self.pos += 1;
                self.hex4().map(drop)
            }
            _ => Err(self.error("an escape: one of \"\\/bfnrtu")),
        }
    }
}

#[inline(always)]
fn skip_ws(buf: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = buf.get(i) {
        i += 1;
    }
    i
}

/// Length of the run of plain string bytes: up to a quote, a backslash or a control
/// character.
#[inline]
fn string_run(bytes: &[u8]) -> usize {
    bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).unwrap_or(bytes.len())
}

/// A JSON number as read by [`scan_decimal`]: `±mantissa × 10^exponent`, exact when it
/// has at most 19 significant digits.
struct Decimal {
    end: usize,
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
    fn to_f32(&self, buf: &[u8], start: usize) -> f32 {
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
    fn quick_f32(&self) -> Option<f32> {
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
const WINDOW: usize = 48;

/// The common shape of an element, `-?int(.frac)?(e[+-]?exp)?` with at most 7 integer
/// digits, 23 fraction digits and 4 exponent digits, read from a fixed window with few
/// checks. `None` for anything else, every error included, and near the end of the body:
/// [`scan_decimal`] then reads it (and so is the one to say what is wrong).
#[inline(always)]
fn common_number(buf: &[u8], start: usize) -> Option<(f32, usize)> {
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
fn starts_number(buf: &[u8], i: usize) -> bool {
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
fn scan_decimal(buf: &[u8], start: usize) -> std::result::Result<Decimal, usize> {
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
fn digit_run(buf: &[u8], i: usize) -> Option<(u64, usize)> {
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
fn scan_number(buf: &[u8], start: usize) -> std::result::Result<usize, usize> {
    scan_decimal(buf, start).map(|d| d.end)
}

/// A checked JSON number rounded once to the nearest `f64` (infinite past `f64::MAX`).
fn parse_f64(text: &[u8]) -> f64 {
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

fn literal_name(word: &[u8]) -> &'static str {
    match word {
        b"true" => "`true`",
        b"false" => "`false`",
        b"null" => "`null`",
        b"NaN" => "`NaN`",
        _ => "`Infinity`",
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    use super::super::{parse_batch, parse_batch_serde, Limits, Rejection};
    use crate::config::PartSettings;
    use crate::model::{Metadata, Part, Schema};

    fn schema() -> Schema {
        Schema::new(&[
            PartSettings { type_name: "T".into(), field: "t".into(), dims: 3 },
            PartSettings { type_name: "I".into(), field: "i".into(), dims: 2 },
            PartSettings { type_name: "V".into(), field: "v".into(), dims: 6 },
        ])
    }

    const LIMITS: Limits =
        Limits { max_id_bytes: 24, similarity: crate::config::Similarity::L2Norm, max_metadata_bytes: usize::MAX };

    /// What a path made of a body, with vectors as bits so that `-0.0`, NaN payloads and
    /// rounding are compared exactly.
    #[derive(Debug, PartialEq)]
    struct Outcome {
        parts: Vec<(String, usize, Vec<u32>, Option<Metadata>)>,
        rejected: Vec<Rejection>,
    }

    fn outcome((parts, rejected): (Vec<Part>, Vec<Rejection>)) -> Outcome {
        let parts = parts
            .into_iter()
            .map(|p| (p.id, p.slot, p.vector.iter().map(|x| x.to_bits()).collect(), p.metadata))
            .collect();
        Outcome { parts, rejected }
    }

    fn fast(body: &[u8]) -> Result<Outcome, String> {
        parse_batch(body, &schema(), LIMITS).map(outcome).map_err(|e| e.to_string())
    }

    fn serde(body: &[u8]) -> Result<Outcome, String> {
        parse_batch_serde(body, &schema(), LIMITS).map(outcome).map_err(|e| e.to_string())
    }

    /// Both paths agree: the same outcome, or both fail. One allowed difference: where
    /// serde_json fails on a number too large for an `f64`, the fast path may succeed
    /// (an element like that becomes an infinity and its item is rejected).
    fn assert_same(body: &[u8]) {
        match (fast(body), serde(body)) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "body: {}", String::from_utf8_lossy(body)),
            (Err(_), Err(_)) => {}
            (Ok(_), Err(e)) if e.starts_with("number out of range") => {}
            (a, b) => panic!("fast: {a:?}\nserde: {b:?}\nbody: {}", String::from_utf8_lossy(body)),
        }
    }

    // ---- generators ---------------------------------------------------------------------

    /// A JSON string literal mixing plain text, escapes, raw and escaped non-ASCII (with
    /// surrogate pairs); escaped control characters (which make a bad id) are rarer.
    fn string(rng: &mut StdRng, max_pieces: usize) -> String {
        const PIECES: &[&str] = &[
            "a",
            "sku",
            "-",
            "7",
            " ",
            "é",
            "日本",
            "😀",
            "\\\"",
            "\\\\",
            "\\/",
            "\\u00e9",
            "\\u00E9",
            "\\u20ac",
            "\\ud83d\\ude00",
            "\\uD834\\uDD1E",
            "\\u0041",
        ];
        const CONTROL: &[&str] = &["\\b", "\\f", "\\n", "\\r", "\\t", "\\u0000", "\\u001f"];
        let n = rng.random_range(0..=max_pieces);
        let piece = |rng: &mut StdRng| {
            let from = if rng.random_bool(0.03) { CONTROL } else { PIECES };
            from[rng.random_range(0..from.len())]
        };
        let body: String = (0..n).map(|_| piece(rng)).collect();
        format!("\"{body}\"")
    }

    /// `x` printed exactly, then nudged just below (`-1`) or above (`1`) by a digit far
    /// past `f64` precision, or left exact (`0`).
    fn exact_decimal(x: f64, nudge: i32) -> String {
        let text = format!("{x:.110e}");
        let (mantissa, exponent) = text.split_once('e').unwrap();
        let mut digits: Vec<u8> = mantissa.bytes().collect();
        match nudge {
            1 => digits.push(b'1'),
            -1 => {
                // ...d000 -> ...(d-1)999: the exact value minus one unit in the last place.
                let last = digits.iter().rposition(|&d| (b'1'..=b'9').contains(&d)).unwrap();
                digits[last] -= 1;
                for d in &mut digits[last + 1..] {
                    *d = b'9';
                }
                digits.push(b'9');
            }
            _ => {}
        }
        format!("{}e{exponent}", String::from_utf8(digits).unwrap())
    }

    /// A number as clients print them, and the awkward cases: exponents in every form,
    /// signed zeros, subnormals, values next to a halfway point between two `f32`s
    /// (where rounding through `f64` matters), very long digit strings, `f32` overflow.
    fn number(rng: &mut StdRng) -> String {
        let x: f32 = rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-8..8));
        match rng.random_range(0..16) {
            0 | 1 => format!("{}", x as f64),
            2 | 3 => ryu::Buffer::new().format(x).to_owned(),
            4 => format!("{}", rng.random_range(-100_000i64..100_000)),
            5 => ["0", "-0", "0.0", "-0.0", "0e0", "-0E-0", "0.000e+00", "1E0", "1e+1", "-2.5E-3"]
                [rng.random_range(0..10)]
            .to_owned(),
            6 => {
                let text = format!("{:e}", x as f64);
                let (mantissa, exponent) = text.split_once('e').unwrap();
                let (sign, digits) = exponent.strip_prefix('-').map_or(("", exponent), |d| ("-", d));
                let sign = if sign.is_empty() && rng.random_bool(0.5) { "+" } else { sign };
                let e = ["e", "E"][rng.random_range(0..2)];
                format!("{mantissa}{e}{sign}{}{digits}", "0".repeat(rng.random_range(0..3)))
            }
            7 => {
                let sub = f32::from_bits(rng.random_range(1..0x0080_0000u32));
                [format!("{:e}", sub as f64), ryu::Buffer::new().format(sub).to_owned()][rng.random_range(0..2)].clone()
            }
            8 => ["5e-324", "4.9406564584124654e-324", "2.2250738585072014e-308", "1e-400", "-1e-46", "7e-46"]
                [rng.random_range(0..6)]
            .to_owned(),
            9 | 10 => {
                let next = f32::from_bits(x.to_bits() + 1);
                let mid = (x as f64 + next as f64) / 2.0;
                exact_decimal(mid, rng.random_range(-1..=1))
            }
            11 => {
                let len = rng.random_range(20..400);
                let digits: String = (0..len).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect();
                let digits = digits.trim_start_matches('0');
                let digits = if digits.is_empty() { "1" } else { digits };
                format!("0.{digits}")
            }
            12 => {
                let len = rng.random_range(20..60);
                let digits: String = (0..len).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect();
                format!("{}{}e-{}", rng.random_range(1..10), digits, len + rng.random_range(0..5))
            }
            13 if rng.random_bool(0.2) => {
                ["1e39", "-3.5e38", "3.4028236e38", "1.7976931348623157e308"][rng.random_range(0..4)].to_owned()
            }
            13 => ["3.4028235e38", "-3.4028234663852886e38", "3.40282356e38"][rng.random_range(0..3)].to_owned(),
            14 => format!("{}", rng.random::<u64>()) + &"0".repeat(rng.random_range(0..5)),
            _ => format!("{:.9}", x),
        }
    }

    fn whitespace(rng: &mut StdRng) -> &'static str {
        [" ", "", "", "\n", "\t", "\r\n  "][rng.random_range(0..6)]
    }

    /// Any JSON value, for unknown keys and metadata.
    fn value(rng: &mut StdRng, depth: u32) -> String {
        let pick = if depth == 0 { rng.random_range(0..5) } else { rng.random_range(0..7) };
        match pick {
            0 => "null".to_owned(),
            1 => ["true", "false"][rng.random_range(0..2)].to_owned(),
            2 => number(rng).replace("1e39", "1e3").replace("1e-400", "0"),
            3 | 4 => string(rng, 4),
            5 => {
                let n = rng.random_range(0..4);
                let elements: Vec<_> = (0..n).map(|_| value(rng, depth - 1)).collect();
                format!("[{}]", elements.join(", "))
            }
            _ => object(rng, depth - 1),
        }
    }

    fn object(rng: &mut StdRng, depth: u32) -> String {
        let n = rng.random_range(0..4);
        let members: Vec<_> = (0..n).map(|_| format!("{}:{}", string(rng, 2), value(rng, depth))).collect();
        format!("{{{}}}", members.join(","))
    }

    /// A value of a type the field does not want.
    fn wrong(rng: &mut StdRng) -> String {
        ["7", "-1.5e3", "null", "true", "false", "[1, \"a\", {\"k\": [2]}]", "{\"a\": {\"b\": null}}", "\"x\""]
            [rng.random_range(0..8)]
        .to_owned()
    }

    fn vector(rng: &mut StdRng, dims: usize) -> String {
        let len = if rng.random_bool(0.9) { dims } else { rng.random_range(0..8) };
        let elements: Vec<_> = (0..len)
            .map(|_| {
                let e = if rng.random_bool(0.02) { wrong(rng) } else { number(rng) };
                format!("{}{e}", whitespace(rng))
            })
            .collect();
        format!("[{}]", elements.join(","))
    }

    fn item(rng: &mut StdRng) -> String {
        let types = [("\"T\"", 3), ("\"I\"", 2), ("\"V\"", 6), ("\"V\"", 6), ("\"\\u0054\"", 3), ("\"AUDIO\"", 3)];
        let (type_name, dims) = types[rng.random_range(0..types.len())];
        let mut members = Vec::new();
        let mut add = |rng: &mut StdRng, key: &str, value: String, p: f64| {
            if rng.random_bool(p) {
                members.push(format!("\"{key}\"{}:{}{value}", whitespace(rng), whitespace(rng)));
            }
        };
        // A leading `i`: an empty id is one more way to be rejected, and there are enough.
        let id = if rng.random_bool(0.9) { format!("\"i{}", &string(rng, 4)[1..]) } else { wrong(rng) };
        add(rng, "id", id, 0.97);
        let type_value = if rng.random_bool(0.95) { type_name.to_owned() } else { wrong(rng) };
        add(rng, "embedding_type", type_value, 0.97);
        let embedding = if rng.random_bool(0.95) { vector(rng, dims) } else { wrong(rng) };
        add(rng, "embedding", embedding, 0.97);
        let metadata = match rng.random_range(0..10) {
            0 => "null".to_owned(),
            1 => wrong(rng),
            2 => format!("{{\"{}\": 1}}", ["id", "t", "completed_at"][rng.random_range(0..3)]),
            _ => object(rng, 2),
        };
        add(rng, "metadata", metadata.clone(), 0.4);
        for _ in 0..rng.random_range(0..3) {
            let key = ["extra", "Id", "embeddings", "embedding_typ", "\\u0069d", "k\\n"][rng.random_range(0..6)];
            // `\u0069d` is `id`: a second id, which wins.
            let extra = if key == "\\u0069d" { string(rng, 3) } else { value(rng, 3) };
            add(rng, key, extra, 1.0);
        }
        members.shuffle(rng);
        format!("{{{}}}", members.join(","))
    }

    fn body(rng: &mut StdRng, max_items: usize) -> String {
        let n = rng.random_range(0..=max_items);
        let items: Vec<_> = (0..n).map(|_| format!("{}{}", whitespace(rng), item(rng))).collect();
        let items = format!("[{}]", items.join(","));
        if rng.random_bool(0.05) {
            return format!("[{items}]");
        }
        let mut members = vec![format!("\"embeddings\":{}{items}", whitespace(rng))];
        for _ in 0..rng.random_range(0..3) {
            members.push(format!("{}:{}", string(rng, 3), value(rng, 3)));
        }
        members.shuffle(rng);
        format!("{}{{{}}}{}", whitespace(rng), members.join(","), whitespace(rng))
    }

    // ---- equivalence --------------------------------------------------------------------

    #[test]
    fn generated_bodies_decode_the_same_through_both_paths() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for _ in 0..1500 {
            let body = body(&mut rng, 6);
            assert!(serde(body.as_bytes()).is_ok(), "the generator makes valid JSON: {body}");
            assert_same(body.as_bytes());
        }
    }

    #[test]
    fn generated_numbers_round_like_serde_and_std() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let text = number(&mut rng);
            let body =
                format!("{{\"embeddings\":[{{\"id\":\"a\",\"embedding_type\":\"I\",\"embedding\":[{text}, 0]}}]}}");
            let bits = |o: Result<Outcome, String>| -> Option<u32> {
                let o = o.unwrap();
                o.parts.first().map(|p| p.2[0]).or_else(|| o.rejected.first().map(|_| 0x7f80_0000))
            };
            let want = (text.parse::<f64>().unwrap() as f32).to_bits();
            // A value whose square overflows f32 is refused too (Elasticsearch's magnitude check).
            let x = f32::from_bits(want);
            let want = if (x * x).is_finite() { want } else { 0x7f80_0000 };
            assert_eq!(bits(fast(body.as_bytes())), Some(want), "{text}");
            assert_eq!(bits(serde(body.as_bytes())), Some(want), "{text}");
        }
    }

    /// The quick path of `Decimal::quick_f32` against fast-float2, where it matters most:
    /// decimals a few `f64` ulps from a point halfway between two `f32`s, and plain ones
    /// of every length and exponent it handles.
    #[test]
    fn the_quick_f32_path_equals_fast_float_then_as_f32() {
        let mut rng = StdRng::seed_from_u64(99);
        let mut texts = Vec::new();
        for _ in 0..2000 {
            let x: f32 = rng.random_range(0.5f32..1.0) * 10f32.powi(rng.random_range(-30..30));
            let mid = (x as f64 + f32::from_bits(x.to_bits() + 1) as f64) / 2.0;
            for k in [-200i64, -65, -64, -63, -5, -1, 0, 1, 5, 63, 64, 65, 200] {
                let near = f64::from_bits((mid.to_bits() as i64 + k) as u64);
                texts.push(format!("{near:e}"));
                texts.push(format!("{near:?}"));
            }
        }
        for _ in 0..50_000 {
            let digits = rng.random_range(1..=20);
            let mantissa: String = (0..digits).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect();
            let mantissa = mantissa.trim_start_matches('0');
            let mantissa = if mantissa.is_empty() { "1" } else { mantissa };
            texts.push(format!("-{mantissa}e{}", rng.random_range(-70..40)));
            let point = rng.random_range(0..=mantissa.len());
            texts.push(format!("0.{}{mantissa}", "0".repeat(rng.random_range(0..25))));
            texts.push(format!("{}.{}0", &mantissa[..point.max(1)], &mantissa[point.max(1)..]));
        }
        let mut quick = 0;
        for text in &texts {
            let decimal = super::scan_decimal(text.as_bytes(), 0).unwrap();
            assert_eq!(decimal.end, text.len(), "{text}");
            let want = fast_float2::parse::<f64, _>(text).unwrap() as f32;
            if let Some(got) = decimal.quick_f32() {
                assert_eq!(got.to_bits(), want.to_bits(), "{text}");
                quick += 1;
            }
        }
        assert!(quick > texts.len() / 2, "the quick path took only {quick} of {}", texts.len());
    }

    /// `common_number` must take only valid numbers, end them where the full scan does,
    /// and round them the same; whatever it declines goes to the full scan anyway.
    #[test]
    fn the_common_number_lane_agrees_with_the_full_scan() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut texts: Vec<String> = (0..20_000).map(|_| number(&mut rng)).collect();
        const ALPHABET: &[u8] = b"0000123456789..--+eE";
        for _ in 0..60_000 {
            let len = rng.random_range(1..30);
            texts.push((0..len).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])).collect());
        }
        let mut taken = 0;
        for text in &texts {
            let tail = [", 1.5]", "]", " ,", "x", "e5", ".5"][rng.random_range(0..6)];
            let body = format!("{text}{tail}{}", " ".repeat(super::WINDOW));
            let Some((x, end)) = super::common_number(body.as_bytes(), 0) else { continue };
            taken += 1;
            let decimal = super::scan_decimal(body.as_bytes(), 0).unwrap_or_else(|_| panic!("took {body:?}"));
            assert_eq!(end, decimal.end, "{body:?}");
            let want = fast_float2::parse::<f64, _>(&body[..end]).unwrap() as f32;
            assert_eq!(x.to_bits(), want.to_bits(), "{body:?}");
        }
        assert!(taken > 20_000, "the lane took only {taken}");
    }

    #[test]
    fn digit_runs_stop_at_any_non_digit() {
        let mut rng = StdRng::seed_from_u64(8);
        for n in 0..=8 {
            for stop in (0..=255u8).filter(|b| !b.is_ascii_digit()) {
                let mut bytes: Vec<u8> = (0..n).map(|_| b'0' + rng.random_range(0..10u8)).collect();
                bytes.push(stop);
                bytes.extend((0..8).map(|_| rng.random::<u8>()));
                let text = std::str::from_utf8(&bytes[..n]).unwrap();
                let want = if n == 0 { 0 } else { text.parse::<u64>().unwrap() };
                assert_eq!(super::digit_run(&bytes, 0), Some((want, n)), "{bytes:?}");
            }
        }
    }

    #[test]
    fn the_ingest_examples_decode_the_same_through_both_paths() {
        let bodies = [
            r#"{"embeddings": [{"id": "a", "embedding_type": "T", "embedding": [1, 2.5, -3e-2], "extra": {"x": [1]}},
                {"id": "a", "embedding_type": "I", "embedding": [0.1, 0.2], "metadata": {"lang": "en"}}]}"#,
            r#"{"embeddings": [{"id": "ok", "embedding_type": "T", "embedding": [1, 2, 3]},
                {"id": "x", "embedding_type": "AUDIO", "embedding": [1, 2, 3]},
                {"id": "x", "embedding_type": "T", "embedding": [1, 2]},
                {"id": "x", "embedding_type": "T", "embedding": [1, "2", 3]},
                {"id": "", "embedding_type": "T", "embedding": [1, 2, 3]},
                {"id": "1234567890123456789012345", "embedding_type": "T", "embedding": [1, 2, 3]},
                {"id": 7, "embedding_type": "T", "embedding": [1, 2, 3]},
                {"id": "x", "embedding_type": "T", "embedding": [1, 2, 1e39]},
                {"id": "x", "embedding_type": "T", "embedding": [1, 2, 3], "metadata": {"id": "no"}},
                {"embedding_type": "T", "embedding": [1, 2, 3]},
                {"id": "x", "embedding_type": "T", "embedding": "1,2,3"}]}"#,
            r#"{"embeddings": ["#,
            r#"{"items": []}"#,
            "[1,2]",
        ];
        for body in bodies {
            assert_same(body.as_bytes());
        }
        assert_eq!(fast(bodies[1].as_bytes()).unwrap().rejected.len(), 10);
    }

    // ---- corrupted bodies ---------------------------------------------------------------

    const SMALL: &str = r#"{"pad": [1, {"k": "v\u00e9"}], "embeddings": [
        {"id": "a\"b\\n", "embedding_type": "T", "embedding": [1, -2.5e-3, 0.125], "metadata": {"lang": ["en", 1.5]}},
        {"embedding": [0.5, 1E2], "id": "\ud83d\ude00", "embedding_type": "I", "x": null},
        {"id": 3, "embedding_type": "T", "embedding": [true, 1, 2]}]}"#;

    #[test]
    fn every_truncation_fails_in_both_paths() {
        assert!(fast(SMALL.as_bytes()).is_ok());
        for end in 0..SMALL.len() {
            let cut = &SMALL.as_bytes()[..end];
            assert!(fast(cut).is_err(), "{}", String::from_utf8_lossy(cut));
            assert_same(cut);
        }
    }

    /// Bytes that change JSON's meaning get most of the draws.
    fn random_byte(rng: &mut StdRng) -> u8 {
        const TELLING: &[u8] = b"{}[],:\"\\ 0123456789-+.eEtrufalsnu/\n\t\x00\x1f\x7f\x80\xbf\xc3\xe9\xed\xf0\xff";
        if rng.random_bool(0.8) {
            TELLING[rng.random_range(0..TELLING.len())]
        } else {
            rng.random()
        }
    }

    fn mutate(rng: &mut StdRng, body: &mut Vec<u8>) {
        let at = rng.random_range(0..body.len());
        match rng.random_range(0..4) {
            0 => body[at] = random_byte(rng),
            1 => body.insert(at, random_byte(rng)),
            2 => {
                body.remove(at);
            }
            _ => body[at] ^= 1 << rng.random_range(0..8),
        }
    }

    #[test]
    fn corrupted_bodies_get_the_same_answer_from_both_paths() {
        let mut rng = StdRng::seed_from_u64(42);
        for round in 0..6000 {
            let mut body = if round % 2 == 0 { SMALL.as_bytes().to_vec() } else { body(&mut rng, 2).into_bytes() };
            if body.is_empty() {
                continue;
            }
            for _ in 0..rng.random_range(1..=3) {
                if !body.is_empty() {
                    mutate(&mut rng, &mut body);
                }
            }
            assert_same(&body);
        }
    }

    // ---- the edges, one by one ----------------------------------------------------------

    fn with_vector(elements: &str) -> String {
        format!(r#"{{"embeddings":[{{"id":"a","embedding_type":"T","embedding":[{elements}]}}]}}"#)
    }

    fn with_id(id: &str) -> String {
        format!(r#"{{"embeddings":[{{"id":{id},"embedding_type":"I","embedding":[1,2]}}]}}"#)
    }

    #[test]
    fn syntax_errors_fail_the_request_in_both_paths() {
        let bodies = [
            with_vector("1,2,3") + "x",
            with_vector("1,2,3") + "{}",
            with_vector("1 2,3"),
            with_vector("1,2,3,"),
            with_vector("1,,3"),
            with_vector("01,2,3"),
            with_vector("1.,2,3"),
            with_vector(".5,2,3"),
            with_vector("+1,2,3"),
            with_vector("1e,2,3"),
            with_vector("1e+,2,3"),
            with_vector("-,2,3"),
            with_vector("- 1,2,3"),
            with_vector("tru,2,3"),
            with_vector("nul,2,3"),
            with_vector("1,2,3]"),
            with_vector("-NaN,2,3"),
            with_vector("nan,2,3"),
            with_vector("inf,2,3"),
            with_id("\"a"),
            with_id("\"a\tb\""),
            with_id("\"a\\xb\""),
            with_id("\"a\\u12\""),
            with_id("\"a\\u12g4\""),
            with_id("\"\\ud800\""),
            with_id("\"\\udc00\""),
            with_id("\"\\ud800\\u0041\""),
            with_id("\"\\ud800x\""),
            with_id("NaN"),
            with_id("Infinity"),
            with_id("1e400"),
            with_id("[NaN]"),
            r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],"metadata":{"x":1e400}}]}"#.into(),
            r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],"metadata":{"x":"\udc00"}}]}"#.into(),
            r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":{"\ud800":1}}]}"#.into(),
            r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[[NaN]]}]}"#.into(),
            r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2]},]}"#.into(),
            r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],}]}"#.into(),
            r#"{"embeddings":[{,"id":"a"}]}"#.into(),
            r#"{"embeddings":[{"id" "a"}]}"#.into(),
            r#"{"embeddings":[{"id":"a" "x":1}]}"#.into(),
            r#"{"embeddings":[{"id":"a"}], "embeddings": []}"#.into(),
            r#"{"embeddings":[null]}"#.into(),
            r#"{"embeddings":null}"#.into(),
            r#"{"embeddings":[], "x": [1,]}"#.into(),
            r#"{"embeddings":[], "x": {"a":1,}}"#.into(),
            r#"{"embeddings":[], "x": {"a" 1}}"#.into(),
            r#"{"embeddings":[], "x": "\q"}"#.into(),
            r#"{"embeddings":[], 7: 1}"#.into(),
            "{\"embeddings\":[], \"x\": \"a\x01\"}".into(),
            "\u{feff}{\"embeddings\":[]}".into(),
            "[]".into(),
            "[[], []]".into(),
            "".into(),
            "   ".into(),
            "{}".into(),
        ];
        for body in &bodies {
            assert!(fast(body.as_bytes()).is_err(), "fast path took {body}");
            assert!(serde(body.as_bytes()).is_err(), "serde path took {body}");
        }
        let mut invalid_utf8 = with_id("\"a\u{e9}\"").into_bytes();
        let at = invalid_utf8.iter().position(|&b| b == 0xc3).unwrap();
        invalid_utf8[at + 1] = b'!';
        assert!(fast(&invalid_utf8).is_err());
        assert!(serde(&invalid_utf8).is_err());
    }

    #[test]
    fn what_serde_accepts_the_fast_path_accepts() {
        let mut bodies: Vec<Vec<u8>> = vec![
            // The sequence form of the request struct.
            br#"[[{"id":"a","embedding_type":"I","embedding":[1,2]}]]"#.to_vec(),
            // Later duplicates win; escaped keys are keys.
            br#"{"embeddings":[{"id":"a","id":"b","\u0065mbedding_type":"I","embedding":[9],"embedding":[1,2]}]}"#
                .to_vec(),
            br#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],"metadata":{"k":1},"metadata":null}]}"#
                .to_vec(),
            // Skipped strings are not checked for surrogates.
            br#"{"x":"\udc00","embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],"y":["\ud800"]}]}"#
                .to_vec(),
            br#"{"embeddings":[{"id":["\ud800"],"embedding_type":"I","embedding":[1,{"k":"\udc00"}]}]}"#.to_vec(),
            // Numbers out of range where serde only skips them.
            br#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,[1e400]],"x":-1e999}]}"#.to_vec(),
            br#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[0e999999999999, -1e-99999999999]}]}"#
                .to_vec(),
        ];
        // Skipped strings are not checked for UTF-8 either.
        let mut raw = br#"{"x":"?","embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2],"y":"?"}]}"#.to_vec();
        for b in raw.iter_mut().filter(|b| **b == b'?') {
            *b = 0xff;
        }
        bodies.push(raw);
        for body in &bodies {
            assert!(serde(body).is_ok(), "{}", String::from_utf8_lossy(body));
            assert_same(body);
        }
    }

    #[test]
    fn python_non_finite_tokens_reject_only_their_item() {
        for token in ["NaN", "Infinity", "-Infinity"] {
            let body = format!(
                r#"{{"embeddings":[{{"id":"a","embedding_type":"T","embedding":[1, {token}, 3]}},
                    {{"id":"b","embedding_type":"I","embedding":[1, 2]}}]}}"#
            );
            assert!(serde(body.as_bytes()).is_err(), "serde_json refuses {token}");
            let Outcome { parts, rejected } = fast(body.as_bytes()).unwrap();
            assert_eq!(parts.len(), 1);
            assert_eq!((rejected[0].index, rejected[0].code), (0, "non_finite"));
            assert_eq!(rejected[0].reason, "`embedding[1]` is not a finite 32-bit float");
        }
    }

    #[test]
    fn a_number_beyond_f64_is_an_infinity_in_a_vector_and_an_error_elsewhere() {
        let body = with_vector("1, -1e400, 3");
        assert!(serde(body.as_bytes()).unwrap_err().starts_with("number out of range"));
        assert_eq!(fast(body.as_bytes()).unwrap().rejected[0].code, "non_finite");
        assert!(fast(with_id("1e400").as_bytes()).is_err());
        assert!(fast(with_id("-1e999999999999").as_bytes()).is_err());
    }

    #[test]
    fn numbers_too_long_for_fast_float_still_round_correctly() {
        let zeros = "0".repeat(70_000);
        for text in
            [format!("0.{zeros}15e70001"), format!("1{zeros}e-70000"), format!("0.{zeros}1"), format!("1{zeros}")]
        {
            assert_same(with_vector(&format!("{text}, 1, 2")).as_bytes());
        }
        let tiny = fast(with_vector(&format!("0.{zeros}15e70001, 1, 2")).as_bytes()).unwrap();
        assert_eq!(f32::from_bits(tiny.parts[0].2[0]), 1.5);
    }

    #[test]
    fn metadata_nests_as_deep_as_serde_allows_and_skipped_values_without_limit() {
        for depth in [123, 124, 125, 126] {
            let nested = "[".repeat(depth - 1) + &"]".repeat(depth - 1);
            let body = format!(
                r#"{{"embeddings":[{{"id":"a","embedding_type":"I","embedding":[1,2],"metadata":{{"k":{nested}}}}}]}}"#
            );
            assert_eq!(fast(body.as_bytes()).is_ok(), serde(body.as_bytes()).is_ok(), "depth {depth}");
            assert_eq!(fast(body.as_bytes()).is_ok(), depth <= 124, "depth {depth}");
        }
        let nested = "[{\"a\":".repeat(5000) + "1" + &"}]".repeat(5000);
        let body = format!(r#"{{"embeddings":[{{"id":"a","embedding_type":"I","embedding":[1,2],"x":{nested}}}]}}"#);
        assert_same(body.as_bytes());
        assert!(fast(body.as_bytes()).is_ok());
    }

    #[test]
    fn errors_say_where_and_what() {
        let body = with_vector("1, 2 3");
        let err = parse_batch(body.as_bytes(), &schema(), LIMITS).unwrap_err();
        assert_eq!(err.offset(), body.find(" 3").unwrap() + 1);
        assert_eq!(err.to_string(), format!("invalid JSON at byte {}: expected `,` or `]`, found `3`", err.offset()));
        let err = parse_batch(b"{\"embeddings\": [", &schema(), LIMITS).unwrap_err();
        assert!(err.to_string().ends_with("found the end of the body"), "{err}");
        let err = parse_batch(b"{\"items\": []}", &schema(), LIMITS).unwrap_err();
        assert!(err.to_string().contains("`embeddings`"), "{err}");
    }

    #[test]
    fn vectors_get_the_capacity_of_their_type_when_it_comes_first() {
        let body = r#"{"embeddings":[{"id":"a","embedding_type":"I","embedding":[1,2]},
            {"id":"b","embedding":[1,2],"embedding_type":"I"}]}"#;
        let items = super::decode_items(body.as_bytes(), &schema()).unwrap();
        let capacity = |i: usize| items[i].embedding.as_ref().unwrap().as_ref().unwrap().capacity();
        assert_eq!((capacity(0), capacity(1)), (2, 6));
    }
}
