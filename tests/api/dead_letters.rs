//! Dead letters an operator can act on: bounded by `durability.dead_letter_max` in both
//! stores (the oldest dropped and counted), listed by reason, and replayed once the cause
//! is fixed, leaving the store when the sink takes them.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use embedjoin::config::{Settings, StateBackend};
use embedjoin::model::Schema;
use embedjoin::state::{DeadLetter, LetterCursor, StateStore};
use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Value};
use tracing::instrument::WithSubscriber;

use crate::support::app::{spawn_app, test_settings};
use crate::support::data::{item, IMAGE, TEXT};
use crate::support::es::EsTarget;
use crate::support::process::service_env;
use crate::support::redis_server::RedisServer;

fn letter(id: &str, error_type: &str, reason: &str, version: Option<u64>) -> DeadLetter {
    DeadLetter {
        id: id.into(),
        status: Some(400),
        error_type: error_type.into(),
        reason: reason.into(),
        attempts: 1,
        document: Bytes::from(json!({"id": id, "note": "kept"}).to_string()),
        at: SystemTime::now(),
        version,
    }
}

async fn open(settings: &Settings) -> StateStore {
    StateStore::connect(settings, &Schema::new(&settings.parts)).await.expect("the store opens")
}

/// Every letter's id, oldest first.
async fn ids(store: &StateStore) -> Vec<String> {
    let mut cursor = LetterCursor::default();
    let mut out = Vec::new();
    loop {
        let page = store.read_dead_letters(&mut cursor, 2).await.unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page.iter().map(|l| DeadLetter::from_json(&l.json).unwrap().id));
    }
}

/// What a future logs, captured.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        let log = self.clone();
        tracing_subscriber::fmt().with_ansi(false).with_writer(move || log.clone()).finish()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn a_full_store_drops_its_oldest_letters_and_counts_them(backend: StateBackend) {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::defaults();
    settings.state.backend = backend;
    settings.redis.url = redis.url();
    settings.embedded.path = dir.path().join("embedjoin.db");
    settings.durability.dead_letter_max = 3;
    let mut store = open(&settings).await;
    let dropped = Counter::default();
    store.count_dropped_letters_in(dropped.clone());

    let log = Log::default();
    store.dead_letter(&[letter("a", "t", "r", None), letter("b", "t", "r", None)]).await.unwrap();
    assert_eq!(dropped.get(), 0);
    let more = [letter("c", "t", "r", None), letter("d", "t", "r", Some(4)), letter("e", "t", "r", None)];
    store.dead_letter(&more).with_subscriber(log.subscriber()).await.unwrap();
    assert_eq!(ids(&store).await, ["c", "d", "e"], "the oldest went");
    assert_eq!(dropped.get(), 2, "each drop is counted");
    let logged = log.text();
    assert!(logged.contains("ERROR") && logged.contains("dropped=2"), "and logged at ERROR: {logged}");

    // Removing letters while walking them keeps the walk on the next unread one.
    let mut cursor = LetterCursor::default();
    let first = store.read_dead_letters(&mut cursor, 2).await.unwrap();
    store.remove_dead_letters(&mut cursor, &[&first[0]]).await.unwrap();
    let rest = store.read_dead_letters(&mut cursor, 2).await.unwrap();
    let rest: Vec<DeadLetter> = rest.iter().map(|l| DeadLetter::from_json(&l.json).unwrap()).collect();
    assert_eq!(rest.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), ["e"]);
    assert_eq!(ids(&store).await, ["d", "e"]);
    let d = DeadLetter::from_json(&first[1].json).unwrap();
    assert_eq!((d.version, d.document.clone()), (Some(4), Bytes::from(json!({"id": "d", "note": "kept"}).to_string())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_store_drops_its_oldest_letters_and_counts_them() {
    a_full_store_drops_its_oldest_letters_and_counts_them(StateBackend::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_embedded_store_drops_its_oldest_letters_and_counts_them() {
    a_full_store_drops_its_oldest_letters_and_counts_them(StateBackend::Embedded).await
}

/// Runs `embedjoin dead-letters ARGS` against this Redis and index; returns the exit code,
/// stdout lines and stderr.
async fn dead_letters(redis: &RedisServer, es: &EsTarget, args: &[&str]) -> (i32, Vec<String>, String) {
    let env = service_env(&redis.url(), es, &[]);
    let args: Vec<String> = ["dead-letters"].iter().chain(args).map(|s| s.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_embedjoin"))
            .args(&args)
            .envs(env)
            .env_remove("EMBEDJOIN_CONFIG")
            .output()
            .expect("the binary runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect();
    (output.status.code().unwrap_or(-1), stdout, String::from_utf8_lossy(&output.stderr).into_owned())
}

fn letter_ids(lines: &[String]) -> Vec<String> {
    lines.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].as_str().unwrap().to_owned()).collect()
}

/// The index embedjoin creates, plus `price` as an integer unless `fixed`.
fn mappings(fixed: bool) -> Value {
    let mut properties = json!({
        "id": {"type": "keyword"},
        "completed_at": {"type": "date"},
        "text_embedding": {"type": "dense_vector", "dims": 384, "index": true, "similarity": "cosine"},
        "image_embedding": {"type": "dense_vector", "dims": 512, "index": true, "similarity": "cosine"},
    });
    if !fixed {
        properties["price"] = json!({"type": "integer"});
    }
    json!({ "mappings": { "properties": properties } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_the_mapping_refused_is_replayed_after_the_fix_and_leaves_the_list() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: the test rebuilds the stand-in's index") };
    standin.create_index(&es.index, mappings(false)).unwrap();
    let settings = test_settings(&redis, &es);
    let app = spawn_app(settings.clone()).await;
    let mut priced = [item("priced", TEXT, 384), item("priced", IMAGE, 512)];
    priced[0]["metadata"] = json!({"price": "cheap"});
    let batch = json!({"embeddings": [priced[0], priced[1], item("fine", TEXT, 384), item("fine", IMAGE, 512)]});
    assert_eq!(app.post_json(&batch).await.status(), 202);
    assert_eq!(es.wait_for_count(1, Duration::from_secs(30)).await, 1);
    let store = open(&settings).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids(&store).await.is_empty() {
        assert!(Instant::now() < deadline, "the refused document was never dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await.unwrap();
    // Two more letters: another reason, and one whose document is newer in the index.
    store.dead_letter(&[letter("other", "illegal_argument_exception", "something else", None)]).await.unwrap();
    store.dead_letter(&[letter("old", "document_parsing_exception", "failed to parse", Some(5))]).await.unwrap();

    let (code, all, stderr) = dead_letters(&redis, &es, &["list"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(letter_ids(&all), ["priced", "other", "old"]);
    let refused: Value = serde_json::from_str(&all[0]).unwrap();
    assert_eq!((refused["status"].as_u64(), refused["document"]["price"].as_str()), (Some(400), Some("cheap")));
    let by_type = dead_letters(&redis, &es, &["list", "--reason", "document_parsing_exception"]).await;
    assert_eq!(letter_ids(&by_type.1), ["priced", "old"]);
    assert_eq!(letter_ids(&dead_letters(&redis, &es, &["list", "--reason", "something"]).await.1), ["other"]);
    assert_eq!(letter_ids(&dead_letters(&redis, &es, &["list", "--limit", "1"]).await.1), ["priced"]);

    // The fix: the index without the constraint; meanwhile "old" was written, newer.
    assert!(standin.delete_index(&es.index));
    standin.create_index(&es.index, mappings(true)).unwrap();
    es.put_versioned("old", &json!({"id": "old", "note": "newer"}), 9).await;

    let (code, summary, stderr) =
        dead_letters(&redis, &es, &["replay", "--reason", "document_parsing_exception"]).await;
    assert_eq!(code, 0, "{stderr}");
    let summary: Value = serde_json::from_str(summary.last().expect("a summary")).unwrap();
    assert_eq!(
        (&summary["replayed"], &summary["indexed"], &summary["superseded"], &summary["kept"]),
        (&json!(2), &json!(1), &json!(1), &json!(0)),
        "{summary}"
    );
    let doc = es.doc("priced").await.expect("the replayed document is indexed");
    assert_eq!(doc.source["price"], "cheap");
    assert_eq!(doc.source["text_embedding"].as_array().unwrap().len(), 384);
    let old = es.doc("old").await.unwrap();
    assert_eq!((old.version, &old.source["note"]), (9, &json!("newer")), "a replay never goes back");
    assert_eq!(letter_ids(&dead_letters(&redis, &es, &["list"]).await.1), ["other"], "only the unmatched one stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_the_sink_refuses_again_are_kept() {
    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return eprintln!("skipped: the test needs the stand-in's mapping") };
    standin.create_index(&es.index, mappings(false)).unwrap();
    let store = open(&test_settings(&redis, &es)).await;
    let mut bad = letter("still-bad", "document_parsing_exception", "failed to parse", None);
    bad.document = Bytes::from(json!({"id": "still-bad", "price": "cheap"}).to_string());
    store.dead_letter(&[bad, letter("good-now", "document_parsing_exception", "failed to parse", None)]).await.unwrap();

    let (code, summary, stderr) = dead_letters(&redis, &es, &["replay"]).await;
    assert_eq!(code, 0, "{stderr}");
    let summary: Value = serde_json::from_str(summary.last().expect("a summary")).unwrap();
    assert_eq!((&summary["indexed"], &summary["kept"]), (&json!(1), &json!(1)), "{summary}");
    assert_eq!(summary["kept_by_error"]["document_parsing_exception"], 1);
    assert_eq!(ids(&store).await, ["still-bad"]);
    assert!(es.doc("good-now").await.is_some());
}
