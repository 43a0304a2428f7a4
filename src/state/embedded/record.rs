//! The value the embedded store keeps per item (a partial, or an outbox entry): what a
//! Redis hash holds, in one binary record. Parts are kept by type name, not by slot, so a
//! record stays readable when the configured parts change (unknown ones are ignored, as
//! Redis ignores unknown hash fields).
//!
//! Layout, all integers little-endian: version `u8` (1), stamp `u64`, token (`u32` length
//! or `u32::MAX` for none, bytes), part count `u16`, then per part: name (`u16` length,
//! bytes), vector (`u32` length, f32 LE bytes), metadata JSON (`u32` length or `u32::MAX`).

use crate::state::StateError;

const VERSION: u8 = 1;
const NONE: u32 = u32::MAX;

/// One stored part.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPart {
    pub type_name: String,
    /// The vector as f32 little-endian bytes.
    pub vector: Vec<u8>,
    /// The part's metadata as JSON, if it carried any.
    pub meta: Option<Vec<u8>>,
}

/// An item's record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// Milliseconds since the epoch: last update of a partial, or completion (or last
    /// claim) of an outbox entry. Also the first half of the item's index key.
    pub stamp: u64,
    /// The completion token of an outbox entry.
    pub token: Option<String>,
    pub parts: Vec<StoredPart>,
}

impl Record {
    /// Sets a part. Its metadata replaces the stored one only when it has some, like the
    /// Redis merge, which writes `meta:<part>` only when the part carries metadata.
    pub fn set(&mut self, type_name: &str, vector: Vec<u8>, meta: Option<Vec<u8>>) {
        match self.parts.iter_mut().find(|p| p.type_name == type_name) {
            Some(part) => {
                part.vector = vector;
                if meta.is_some() {
                    part.meta = meta;
                }
            }
            None => self.parts.push(StoredPart { type_name: type_name.to_owned(), vector, meta }),
        }
    }

    pub fn part(&self, type_name: &str) -> Option<&StoredPart> {
        self.parts.iter().find(|p| p.type_name == type_name)
    }

    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self.parts.iter().map(|p| 10 + p.type_name.len() + p.vector.len()).sum();
        let mut out = Vec::with_capacity(size + 16 + self.token.as_ref().map_or(0, String::len));
        out.push(VERSION);
        out.extend_from_slice(&self.stamp.to_le_bytes());
        put(&mut out, self.token.as_deref().map(str::as_bytes));
        out.extend_from_slice(&(self.parts.len() as u16).to_le_bytes());
        for part in &self.parts {
            out.extend_from_slice(&(part.type_name.len() as u16).to_le_bytes());
            out.extend_from_slice(part.type_name.as_bytes());
            put(&mut out, Some(&part.vector));
            put(&mut out, part.meta.as_deref());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, StateError> {
        let mut r = Reader(bytes);
        if r.take(1)? != [VERSION] {
            return Err(corrupt("unknown record version"));
        }
        let stamp = u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
        let token = r.optional()?.map(|t| String::from_utf8(t.to_vec())).transpose().map_err(|_| corrupt("token"))?;
        let count = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
        let mut parts = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
            let type_name = std::str::from_utf8(r.take(len as usize)?).map_err(|_| corrupt("part name"))?.to_owned();
            let vector = r.optional()?.ok_or_else(|| corrupt("vector"))?.to_vec();
            let meta = r.optional()?.map(<[u8]>::to_vec);
            parts.push(StoredPart { type_name, vector, meta });
        }
        if !r.0.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Record { stamp, token, parts })
    }
}

fn put(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        None => out.extend_from_slice(&NONE.to_le_bytes()),
    }
}

fn corrupt(what: &str) -> StateError {
    StateError::Protocol(format!("unreadable record in the embedded store ({what})"))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.0.len() < n {
            return Err(corrupt("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn optional(&mut self) -> Result<Option<&'a [u8]>, StateError> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
        if len == NONE {
            return Ok(None);
        }
        self.take(len as usize).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_truncated_one_is_an_error() {
        let mut r = Record { stamp: 42, token: Some("ab-1".into()), parts: Vec::new() };
        r.set("T", vec![1, 2, 3, 4], Some(b"{\"a\":1}".to_vec()));
        r.set("I", vec![5; 8], None);
        let bytes = r.encode();
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        assert!(Record::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Record::decode(&[]).is_err());
    }

    #[test]
    fn a_part_without_metadata_keeps_the_stored_metadata() {
        let mut r = Record::default();
        r.set("T", vec![1; 4], Some(b"{}".to_vec()));
        r.set("T", vec![2; 4], None);
        assert_eq!(r.parts.len(), 1);
        assert_eq!(r.part("T").unwrap().vector, vec![2; 4]);
        assert_eq!(r.part("T").unwrap().meta.as_deref(), Some(&b"{}"[..]));
    }
}
