//! `embedjoin dead-letters list|replay`: what an operator does with the documents the sink
//! refused for good, once the cause is known (`list`) and fixed (`replay`).
//!
//! - `list [--reason R] [--limit N]` prints the stored letters, oldest first, one JSON
//!   object a line on stdout, as stored (see [`DeadLetter::to_json`]).
//! - `replay [--reason R]` sends each letter's document again to the configured sink: an
//!   `index` action with `_id` = its id and, when the letter has a version, that version as
//!   `external_gte`, so that a replay never overwrites a newer write. A letter leaves the
//!   store when the sink took it (2xx) or already holds a newer version (409
//!   `version_conflict_engine_exception`); any other answer keeps it. Requests respect
//!   `elasticsearch.bulk_max_docs` and `bulk_max_bytes`. A summary goes to stdout as one
//!   JSON line. A failed request (the sink down, a 401, ...) stops the replay with exit
//!   status 1: what was taken before is removed, the rest stays.
//!
//! `--reason R` selects letters whose `error_type` is R or whose `reason` contains R.
//! Letters that cannot be read, or that hold no document (`null`: an outbox entry that
//! could not be read back), are listed but never replayed.
//!
//! With the embedded store, run it while the service is stopped (one process opens the
//! file). With Redis it may run beside the service; letters the service appends meanwhile
//! are only touched if they match. Removal is by exact content (`LREM`), so a letter
//! trimmed by the cap meanwhile is simply gone.

use std::collections::BTreeMap;
use std::process::ExitCode;

use bytes::{BufMut, BytesMut};
use clap::{Args, Subcommand};

use crate::config::{LatePartsAction, Settings};
use crate::model::Schema;
use crate::sink::encode::{reencode, Action};
use crate::sink::{ItemStatus, SinkClient};
use crate::state::{DeadLetter, LetterCursor, StateStore, StoredLetter};

/// Letters read from the store at a time.
const PAGE: usize = 500;

/// `embedjoin dead-letters`' options.
#[derive(Debug, Args)]
pub struct DeadLetterArgs {
    #[command(subcommand)]
    pub command: DeadLetterCommand,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Print dead letters, oldest first, one JSON object a line.
    List {
        /// Only letters whose error_type is this, or whose reason contains it.
        #[arg(long)]
        reason: Option<String>,
        /// Print at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Send the letters' documents to the sink again; remove those it takes.
    Replay {
        /// Only letters whose error_type is this, or whose reason contains it.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// What a replay did, printed as one JSON line.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Letters that matched the filter and were sent in a request the sink answered.
    pub replayed: u64,
    /// Taken by the sink (2xx): removed from the store.
    pub indexed: u64,
    /// The sink holds a newer version (409): removed from the store.
    pub superseded: u64,
    /// Refused again: kept, counted by the sink's error type.
    pub kept: u64,
    pub kept_by_error: BTreeMap<String, u64>,
    /// Matching letters that cannot be replayed (unreadable, or no document): kept.
    pub not_replayable: u64,
}

pub async fn run(settings: &Settings, args: &DeadLetterArgs) -> ExitCode {
    let result = match &args.command {
        DeadLetterCommand::List { reason, limit } => list(settings, reason.as_deref(), *limit).await,
        DeadLetterCommand::Replay { reason } => replay(settings, reason.as_deref()).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embedjoin dead-letters: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn matches(letter: &DeadLetter, reason: Option<&str>) -> bool {
    reason.is_none_or(|r| letter.error_type == r || letter.reason.contains(r))
}

async fn open_store(settings: &Settings) -> anyhow::Result<StateStore> {
    let schema = Schema::new(&settings.parts);
    let store = StateStore::connect(settings, &schema).await;
    store.map_err(|e| anyhow::anyhow!("cannot open the state store ({:?}): {e}", settings.state.backend))
}

async fn list(settings: &Settings, reason: Option<&str>, limit: Option<usize>) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    let (mut cursor, mut printed, limit) = (LetterCursor::default(), 0, limit.unwrap_or(usize::MAX));
    let mut out = std::io::stdout().lock();
    while printed < limit {
        let page = store.read_dead_letters(&mut cursor, PAGE).await?;
        if page.is_empty() {
            break;
        }
        for stored in page {
            let selected = match DeadLetter::from_json(&stored.json) {
                Ok(letter) => matches(&letter, reason),
                Err(e) => {
                    eprintln!("embedjoin dead-letters: an unreadable letter: {e}");
                    reason.is_none()
                }
            };
            if selected && printed < limit {
                use std::io::Write;
                out.write_all(&stored.json)?;
                out.write_all(b"\n")?;
                printed += 1;
            }
        }
    }
    Ok(())
}

async fn replay(settings: &Settings, reason: Option<&str>) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    let schema = Schema::new(&settings.parts);
    let sink = SinkClient::new(settings)?;
    sink.prepare(settings, &schema).await?;
    let (max_docs, max_bytes) = (settings.elasticsearch.bulk_max_docs, settings.elasticsearch.bulk_max_bytes);
    let mut summary = Summary::default();
    let mut cursor = LetterCursor::default();
    let outcome = loop {
        let page = match store.read_dead_letters(&mut cursor, PAGE).await {
            Ok(page) if page.is_empty() => break Ok(()),
            Ok(page) => page,
            Err(e) => break Err(anyhow::Error::from(e)),
        };
        let mut batch: Vec<(&StoredLetter, DeadLetter)> = Vec::new();
        for stored in &page {
            match DeadLetter::from_json(&stored.json) {
                Ok(letter) if !matches(&letter, reason) => {}
                Ok(letter) if &letter.document[..] == b"null" => summary.not_replayable += 1,
                Ok(letter) => batch.push((stored, letter)),
                Err(_) if reason.is_none_or(|r| String::from_utf8_lossy(&stored.json).contains(r)) => {
                    summary.not_replayable += 1
                }
                Err(_) => {}
            }
        }
        let mut taken: Vec<&StoredLetter> = Vec::new();
        let guarded = settings.state.late_parts == LatePartsAction::Update;
        let sent = send(&sink, &batch, (&schema, guarded), (max_docs, max_bytes), &mut summary, &mut taken).await;
        // What the sink took goes even when a later request failed.
        if let Err(e) = store.remove_dead_letters(&mut cursor, &taken).await {
            break Err(e.into());
        }
        if let Err(e) = sent {
            break Err(e);
        }
    };
    println!("{}", serde_json::to_string(&summary)?);
    outcome
}

/// Sends the letters in requests of at most `max_docs` documents and about `max_bytes`;
/// records in `taken` the letters the sink took or holds newer.
async fn send<'a>(
    sink: &SinkClient,
    batch: &[(&'a StoredLetter, DeadLetter)],
    (schema, guarded): (&Schema, bool),
    (max_docs, max_bytes): (usize, usize),
    summary: &mut Summary,
    taken: &mut Vec<&'a StoredLetter>,
) -> anyhow::Result<()> {
    let mut start = 0;
    while start < batch.len() {
        let mut body = BytesMut::new();
        let mut end = start;
        while end < batch.len() && end - start < max_docs {
            let before = body.len();
            encode(&mut body, &batch[end].1, schema, guarded);
            // A request holds at least one document, however large.
            if body.len() > max_bytes && end > start {
                body.truncate(before);
                break;
            }
            end += 1;
        }
        let letters = &batch[start..end];
        let statuses = sink.bulk(body.freeze(), letters.len()).await?;
        summary.replayed += letters.len() as u64;
        for ((stored, _), status) in letters.iter().zip(statuses) {
            match settled(&status) {
                Some(true) => summary.indexed += 1,
                Some(false) => summary.superseded += 1,
                None => {
                    summary.kept += 1;
                    let kind = status.error.map_or_else(|| format!("status {}", status.status), |(kind, _)| kind);
                    *summary.kept_by_error.entry(kind).or_default() += 1;
                    continue;
                }
            }
            taken.push(stored);
        }
        start = end;
    }
    Ok(())
}

/// `Some(true)` indexed, `Some(false)` a newer version is indexed, `None` refused again.
fn settled(status: &ItemStatus) -> Option<bool> {
    if status.is_success() && status.noop {
        return Some(false);
    }
    if status.is_success() {
        return Some(true);
    }
    let newer = status.status == 409
        && status.error.as_ref().is_some_and(|(kind, _)| kind == "version_conflict_engine_exception");
    newer.then_some(false)
}

const PARTS_KEY: &[u8] = b"\"_parts\":{";

/// Whether a letter's document updates some parts of an indexed one: it lacks a configured
/// part and is not an orphan (which says `incomplete`).
fn is_update(letter: &DeadLetter, schema: &Schema) -> bool {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&letter.document) else { return false };
    doc.get("incomplete").is_none() && schema.parts().iter().any(|p| doc.get(&p.field).is_none())
}

/// One operation for the document as it was sent, `_id` = the letter's id. With
/// `late_parts = "update"` and a document that carries its parts' stamps: the guarded
/// upsert, which writes each part only if newer than the indexed one. Otherwise an `index`
/// with the letter's version as `external_gte` when it has one.
fn encode(body: &mut BytesMut, letter: &DeadLetter, schema: &Schema, guarded: bool) {
    let has_stamps = letter.document.windows(PARTS_KEY.len()).any(|w| w == PARTS_KEY);
    if guarded && has_stamps {
        // An update of some parts never creates a document of them alone.
        let action = if is_update(letter, schema) { Action::Merge } else { Action::Upsert };
        let (op, _) = reencode(&letter.id, letter.version.unwrap_or(0), &letter.document, schema, action);
        body.put_slice(&op);
        return;
    }
    let mut index = serde_json::json!({ "_id": letter.id });
    if let Some(version) = letter.version {
        index["version"] = version.into();
        index["version_type"] = "external_gte".into();
    }
    let action = serde_json::to_vec(&serde_json::json!({ "index": index })).expect("a JSON value serialises");
    body.put_slice(&action);
    body.put_u8(b'\n');
    body.put_slice(&letter.document);
    body.put_u8(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::SystemTime;

    fn letter(version: Option<u64>) -> DeadLetter {
        DeadLetter {
            id: "a\"b".into(),
            status: Some(400),
            error_type: "document_parsing_exception".into(),
            reason: "failed to parse field [price]".into(),
            attempts: 1,
            document: Bytes::from_static(br#"{"id":"a\"b","v":[0.1,1e-7]}"#),
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_732_870_000_123),
            version,
        }
    }

    #[test]
    fn guarded_replays_never_create_a_document_of_an_update_alone() {
        let schema = Schema::new(&crate::config::Settings::defaults().parts);
        let with = |document: &'static str| DeadLetter {
            document: Bytes::from_static(document.as_bytes()),
            ..letter(Some(7))
        };
        let update = with(r#"{"id":"a","text_embedding":[0.5],"_parts":{"EMBEDDINGS_TEXT":7}}"#);
        let whole = with(
            r#"{"id":"a","text_embedding":[0.5],"image_embedding":[0.5],"_parts":{"EMBEDDINGS_TEXT":7,"EMBEDDINGS_IMAGE":6}}"#,
        );
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        encode(&mut a, &update, &schema, true);
        encode(&mut b, &whole, &schema, true);
        let body = |buf: &BytesMut| -> serde_json::Value {
            serde_json::from_str(std::str::from_utf8(buf).unwrap().lines().nth(1).unwrap()).unwrap()
        };
        assert!(body(&a).get("scripted_upsert").is_none(), "an update of some parts: a 404 keeps the letter");
        assert_eq!(body(&b)["scripted_upsert"], true, "a whole document is created if missing");
        assert_eq!(body(&a)["script"]["params"]["d"]["_parts"]["EMBEDDINGS_TEXT"], 7);
    }

    #[test]
    fn a_letter_reads_back_with_its_document_bytes_unchanged() {
        let original = letter(Some(7));
        let back = DeadLetter::from_json(&original.to_json()).unwrap();
        assert_eq!((back.id.as_str(), back.version, back.status), ("a\"b", Some(7), Some(400)));
        assert_eq!(back.document, original.document);
        assert_eq!(back.at, original.at);
        assert_eq!(DeadLetter::from_json(&letter(None).to_json()).unwrap().version, None);
        // A reason quoting the marker cannot fool the reader: quotes in strings are escaped.
        let mut tricky = letter(None);
        tricky.reason = r#","document":{}"#.into();
        assert_eq!(DeadLetter::from_json(&tricky.to_json()).unwrap().reason, tricky.reason);
    }

    #[test]
    fn replayed_operations_carry_the_id_and_the_external_version() {
        let schema = Schema::new(&crate::config::Settings::defaults().parts);
        let mut body = BytesMut::new();
        // Without `_parts` in the document (a letter from an older version) an update
        // cannot be guarded: it is replayed as a versioned `index`.
        encode(&mut body, &letter(Some(7)), &schema, true);
        encode(&mut body, &letter(None), &schema, false);
        let text = String::from_utf8(body.to_vec()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], r#"{"index":{"_id":"a\"b","version":7,"version_type":"external_gte"}}"#);
        assert_eq!(lines[1], r#"{"id":"a\"b","v":[0.1,1e-7]}"#);
        assert_eq!(lines[2], r#"{"index":{"_id":"a\"b"}}"#);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn only_a_success_or_a_newer_version_settles_a_letter() {
        let status = |status, kind: &str| ItemStatus { status, error: Some((kind.into(), String::new())), noop: false };
        assert_eq!(settled(&ItemStatus { status: 201, error: None, noop: false }), Some(true));
        assert_eq!(settled(&status(409, "version_conflict_engine_exception")), Some(false));
        assert_eq!(settled(&status(400, "document_parsing_exception")), None);
        assert_eq!(settled(&status(429, "es_rejected_execution_exception")), None);
    }
}
