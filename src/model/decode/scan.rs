//! The JSON side of the decoder: the body's structure, keys, strings, skipped values and
//! metadata, and what each error says. Numbers go to [`super::float`].

use std::borrow::Cow;

use super::float::{common_number, parse_f64, scan_decimal, scan_number, starts_number};
use super::{DecodeError, Found, RawItem, Result};
use crate::model::{Metadata, Schema};

/// serde_json refuses to nest deeper than 127 containers. In the serde path a metadata
/// object is itself at depth 4 (body, `embeddings`, item, metadata), so the deepest
/// container it accepts inside metadata is 124 levels down, counting metadata as 1.
const METADATA_MAX_DEPTH: usize = 124;

/// A vector never gets more capacity up front than this, whatever the config says.
const MAX_RESERVE: usize = 1 << 16;

/// The item keys the decoder knows, in the order of [`Scanner::item`]'s match.
const ITEM_KEYS: &[&[u8]] = &[b"id", b"embedding_type", b"embedding", b"metadata"];

pub(super) struct Scanner<'a> {
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
    pub(super) fn new(buf: &'a [u8], schema: &'a Schema) -> Self {
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
    pub(super) fn end(&mut self) -> Result<()> {
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

    pub(super) fn request(&mut self) -> Result<Vec<RawItem>> {
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

fn literal_name(word: &[u8]) -> &'static str {
    match word {
        b"true" => "`true`",
        b"false" => "`false`",
        b"null" => "`null`",
        b"NaN" => "`NaN`",
        _ => "`Infinity`",
    }
}
