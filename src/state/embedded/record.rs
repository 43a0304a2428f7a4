//! The values the embedded store keeps: an item's record (what the Redis item hash holds)
//! and an outbox entry, in one binary layout. Parts are kept by type name, not by slot, so a
//! record stays readable when the configured parts change (unknown ones are ignored, as
//! Redis ignores unknown hash fields).
//!
//! Layout, all integers little-endian: format `u8` (2), updated `u64` (ms), version `u64`
//! (0: none), kind `u8` (0 none, 1 orphan partial, 2 orphan late, 3 update), part count `u16`, then per part:
//! name (`u16` length, bytes), stamp `u64`, vector (`u32` length or `u32::MAX` for none,
//! f32 LE bytes), metadata JSON (`u32` length or `u32::MAX`).

use crate::model::document::OrphanKind;
use crate::state::StateError;

const FORMAT: u8 = 2;
const NONE: u32 = u32::MAX;

/// One part type of an item.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPart {
    pub type_name: String,
    /// The stamp of the newest copy known.
    pub stamp: u64,
    /// That copy's vector as f32 little-endian bytes, while it waits for the other parts
    /// (always set in an outbox entry).
    pub vector: Option<Vec<u8>>,
    /// That copy's metadata as JSON, if it carried any.
    pub meta: Option<Vec<u8>>,
}

/// An item's record, or an outbox entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// Milliseconds since the epoch of the last update (the partial index's key).
    pub updated: u64,
    /// An item's last completion version, or an outbox entry's version; 0 for none.
    pub version: u64,
    /// For an outbox entry made of an orphan's parts.
    pub orphan: Option<OrphanKind>,
    /// For an outbox entry that updates some parts of an indexed document.
    pub update: bool,
    pub parts: Vec<StoredPart>,
}

impl Record {
    pub fn part(&self, type_name: &str) -> Option<&StoredPart> {
        self.parts.iter().find(|p| p.type_name == type_name)
    }

    /// The stamp known for a part type (0: none).
    pub fn stamp(&self, type_name: &str) -> u64 {
        self.part(type_name).map_or(0, |p| p.stamp)
    }

    /// Sets a part's copy, replacing any older one (the caller compared stamps).
    pub fn set(&mut self, type_name: &str, stamp: u64, vector: Option<Vec<u8>>, meta: Option<Vec<u8>>) {
        let new = StoredPart { type_name: type_name.to_owned(), stamp, vector, meta };
        match self.parts.iter_mut().find(|p| p.type_name == type_name) {
            Some(part) => *part = new,
            None => self.parts.push(new),
        }
    }

    /// Whether some part's copy waits here for the others.
    pub fn has_pending(&self) -> bool {
        self.parts.iter().any(|p| p.vector.is_some())
    }

    pub fn encode(&self) -> Vec<u8> {
        let size: usize =
            self.parts.iter().map(|p| 30 + p.type_name.len() + p.vector.as_ref().map_or(0, Vec::len)).sum();
        let mut out = Vec::with_capacity(size + 24);
        out.push(FORMAT);
        out.extend_from_slice(&self.updated.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(match (self.orphan, self.update) {
            (None, false) => 0,
            (Some(OrphanKind::Partial), _) => 1,
            (Some(OrphanKind::Late), _) => 2,
            (None, true) => 3,
        });
        out.extend_from_slice(&(self.parts.len() as u16).to_le_bytes());
        for part in &self.parts {
            out.extend_from_slice(&(part.type_name.len() as u16).to_le_bytes());
            out.extend_from_slice(part.type_name.as_bytes());
            out.extend_from_slice(&part.stamp.to_le_bytes());
            put(&mut out, part.vector.as_deref());
            put(&mut out, part.meta.as_deref());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, StateError> {
        let mut r = Reader(bytes);
        if r.take(1)? != [FORMAT] {
            return Err(corrupt("unknown record format (written by an older version: drain it with that version)"));
        }
        let updated = r.u64()?;
        let version = r.u64()?;
        let (orphan, update) = match r.take(1)?[0] {
            0 => (None, false),
            1 => (Some(OrphanKind::Partial), false),
            2 => (Some(OrphanKind::Late), false),
            3 => (None, true),
            _ => return Err(corrupt("entry kind")),
        };
        let count = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
        let mut parts = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
            let type_name = std::str::from_utf8(r.take(len as usize)?).map_err(|_| corrupt("part name"))?.to_owned();
            let stamp = r.u64()?;
            let vector = r.optional()?.map(<[u8]>::to_vec);
            let meta = r.optional()?.map(<[u8]>::to_vec);
            parts.push(StoredPart { type_name, stamp, vector, meta });
        }
        if !r.0.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Record { updated, version, orphan, update, parts })
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

    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
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
        let mut r =
            Record { updated: 42, version: 7, orphan: Some(OrphanKind::Late), update: false, parts: Vec::new() };
        r.set("T", 5, Some(vec![1, 2, 3, 4]), Some(b"{\"a\":1}".to_vec()));
        r.set("I", 7, None, None);
        let bytes = r.encode();
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        assert!(Record::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Record::decode(&[]).is_err());
    }

    #[test]
    fn a_newer_copy_replaces_vector_and_metadata_together() {
        let mut r = Record::default();
        r.set("T", 1, Some(vec![1; 4]), Some(b"{}".to_vec()));
        r.set("T", 2, Some(vec![2; 4]), None);
        assert_eq!(r.parts.len(), 1);
        assert_eq!(r.part("T").unwrap().vector.as_deref(), Some(&[2u8; 4][..]));
        assert_eq!(r.part("T").unwrap().meta, None);
        assert!(r.has_pending());
    }
}
