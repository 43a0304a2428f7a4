//! The state store contract, run against every backend: a real `redis-server`, and the
//! embedded store in a temporary directory. "Two stores" are two connections to one Redis,
//! or two handles of one embedded store (a store file is opened once per process).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use embedjoin::config::StateBackend;
use embedjoin::model::document::Partial;
use embedjoin::model::{Document, Metadata, Schema};
use embedjoin::state::{DeadLetter, MergeOutcome, StateStore};
use embedjoin::Settings;
use serde_json::{json, Value};

use crate::support::data::vector;
use crate::support::redis_server::RedisServer;

const TEXT: usize = 0;
const IMAGE: usize = 1;
/// The two default parts, small: the contract does not depend on the size.
const DIMS: [usize; 2] = [4, 6];

/// One backend instance for one test.
struct Backend {
    settings: Settings,
    schema: Schema,
    redis: Option<RedisServer>,
    _dir: tempfile::TempDir,
}

impl Backend {
    async fn start(kind: StateBackend) -> Backend {
        let mut settings = Settings::defaults();
        settings.parts[TEXT].dims = DIMS[TEXT];
        settings.parts[IMAGE].dims = DIMS[IMAGE];
        settings.state.backend = kind;
        let dir = tempfile::tempdir().unwrap();
        settings.embedded.path = dir.path().join("state").join("embedjoin.db");
        let redis = match kind {
            StateBackend::Redis => {
                let server = RedisServer::start().await;
                settings.redis.url = server.url();
                Some(server)
            }
            StateBackend::Embedded => None,
        };
        let schema = Schema::new(&settings.parts);
        Backend { settings, schema, redis, _dir: dir }
    }

    async fn open(&self) -> StateStore {
        StateStore::connect(&self.settings, &self.schema).await.expect("the store opens")
    }

    /// Two stores on this backend, as two instances of the service would have.
    async fn two_stores(&self) -> (StateStore, StateStore) {
        let a = self.open().await;
        let b = match self.redis {
            Some(_) => self.open().await,
            None => a.clone(),
        };
        (a, b)
    }

    /// Every dead letter, oldest first, as JSON.
    async fn dead_letters(&self, store: &StateStore) -> Vec<Value> {
        let raw: Vec<Vec<u8>> = match (&self.redis, store) {
            (Some(redis), _) => {
                let key = format!("{}{}", self.settings.redis.key_prefix, self.settings.redis.dead_letter_key);
                redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query_async(&mut redis.connection().await).await.unwrap()
            }
            (None, StateStore::Embedded(s)) => s.dead_letters().await.unwrap(),
            (None, _) => unreachable!("an embedded backend opens an embedded store"),
        };
        raw.iter().map(|j| serde_json::from_slice(j).expect("a dead letter is JSON")).collect()
    }
}

fn part_vector(id: &str, slot: usize, version: u32) -> Vec<f32> {
    vector(id, ["TEXT", "IMAGE"][slot], DIMS[slot], version)
}

fn meta(value: Value) -> Option<Metadata> {
    value.as_object().cloned()
}

/// A partial holding one part.
fn one(id: &str, slot: usize, version: u32, metadata: Option<Metadata>) -> (String, Partial) {
    let mut p = Partial::new(2, std::time::Instant::now());
    p.vectors[slot] = Some(part_vector(id, slot, version));
    p.metadata[slot] = metadata;
    (id.to_owned(), p)
}

async fn merge_one(store: &StateStore, partial: (String, Partial)) -> MergeOutcome {
    let mut outcomes = store.merge(&[partial]).await.expect("the merge runs");
    assert_eq!(outcomes.len(), 1);
    outcomes.pop().unwrap()
}

fn completed(outcome: MergeOutcome) -> Document {
    match outcome {
        MergeOutcome::Completed(doc) => doc,
        other => panic!("expected a completion, got {other:?}"),
    }
}

fn assert_persisted(outcome: MergeOutcome) {
    assert!(matches!(outcome, MergeOutcome::Persisted), "expected Persisted, got {outcome:?}");
}

/// A complete item in the outbox; returns its document.
async fn complete(store: &StateStore, id: &str) -> Document {
    assert_persisted(merge_one(store, one(id, TEXT, 0, None)).await);
    completed(merge_one(store, one(id, IMAGE, 0, None)).await)
}

async fn merge_persists_then_completes_exactly_once(kind: StateBackend) {
    let backend = Backend::start(kind).await;
    let (a, b) = backend.two_stores().await;
    assert_persisted(merge_one(&a, one("x", TEXT, 0, None)).await);
    assert_eq!(a.inspect("x").await.unwrap().partial, 0b01);
    let doc = completed(merge_one(&b, one("x", IMAGE, 0, None)).await);
    assert_eq!(doc.id, "x");
    assert_eq!(doc.vectors, vec![part_vector("x", TEXT, 0), part_vector("x", IMAGE, 0)]);
    assert!(doc.outbox.is_some(), "a completion in the store has a token");
    let stored = a.inspect("x").await.unwrap();
    assert_eq!((stored.partial, stored.in_outbox), (0, true));
    // A part arriving after completion starts a new partial; it does not complete again.
    assert_persisted(merge_one(&a, one("x", IMAGE, 0, None)).await);

    // Both parts of 100 items through two stores at once: each completes exactly once.
    let ids: Vec<String> = (0..100).map(|i| format!("sku-{i}")).collect();
    let texts: Vec<_> = ids.iter().map(|id| one(id, TEXT, 0, None)).collect();
    let images: Vec<_> = ids.iter().map(|id| one(id, IMAGE, 0, None)).collect();
    let (ta, tb) = tokio::join!(a.merge(&texts), b.merge(&images));
    let mut done: Vec<String> = ta
        .unwrap()
        .into_iter()
        .chain(tb.unwrap())
        .filter_map(|o| match o {
            MergeOutcome::Completed(doc) => Some(doc.id),
            MergeOutcome::Persisted => None,
            MergeOutcome::Failed(e) => panic!("a merge failed: {e}"),
        })
        .collect();
    done.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(done, expected, "every item completed exactly once");
}

async fn later_parts_replace_earlier_ones(kind: StateBackend) {
    let backend = Backend::start(kind).await;
    let store = backend.open().await;
    assert_persisted(merge_one(&store, one("x", TEXT, 1, None)).await);
    assert_persisted(merge_one(&store, one("x", TEXT, 2, None)).await);
    let doc = completed(merge_one(&store, one("x", IMAGE, 0, None)).await);
    assert_eq!(doc.vectors[TEXT], part_vector("x", TEXT, 2));
    assert_ne!(part_vector("x", TEXT, 1), part_vector("x", TEXT, 2));
}

async fn metadata_merges_in_slot_order(kind: StateBackend) {
    let backend = Backend::start(kind).await;
    let store = backend.open().await;
    let image_first = one("x", IMAGE, 0, meta(json!({"title": "image", "w": 3})));
    assert_persisted(merge_one(&store, image_first).await);
    let doc = completed(merge_one(&store, one("x", TEXT, 0, meta(json!({"title": "text", "lang": "en"})))).await);
    // Slot order, not arrival order: the image part's slot comes later and wins.
    assert_eq!(doc.metadata.map(Value::Object), Some(json!({"title": "image", "lang": "en", "w": 3})));

    // A part sent again without metadata keeps the metadata stored with it.
    assert_persisted(merge_one(&store, one("y", TEXT, 0, meta(json!({"lang": "fr"})))).await);
    assert_persisted(merge_one(&store, one("y", TEXT, 1, None)).await);
    let doc = completed(merge_one(&store, one("y", IMAGE, 0, None)).await);
    assert_eq!(doc.metadata.map(Value::Object), Some(json!({"lang": "fr"})));
}

async fn outbox_confirm_needs_the_right_token(kind: StateBackend) {
    let backend = Backend::start(kind).await;
    let (a, b) = backend.two_stores().await;
    let doc = complete(&a, "x").await;
    let token = doc.outbox.clone().unwrap();
    b.confirm(&[("x".into(), format!("{token}-not"))]).await.unwrap();
    assert!(a.inspect("x").await.unwrap().in_outbox, "a wrong token leaves the entry");
    // A newer completion replaces the entry: the older token no longer confirms it.
    let newer = complete(&a, "x").await.outbox.unwrap();
    assert_ne!(newer, token);
    b.confirm(&[("x".into(), token)]).await.unwrap();
    assert!(a.inspect("x").await.unwrap().in_outbox, "the older token leaves the newer entry");
    b.confirm(&[("x".into(), newer)]).await.unwrap();
    assert!(!a.inspect("x").await.unwrap().in_outbox);
    assert!(a.claim_outbox(Duration::ZERO, 10).await.unwrap().is_empty(), "nothing left to resend");
}

async fn claim_outbox_hands_out_old_entries_and_restamps_them(kind: StateBackend) {
    let backend = Backend::start(kind).await;
    let (a, b) = backend.two_stores().await;
    let doc = complete(&a, "x").await;
    let age = Duration::from_millis(300);
    assert!(a.claim_outbox(age, 10).await.unwrap().is_empty(), "too young to resend");
    tokio::time::sleep(age + Duration::from_millis(50)).await;
    let claimed = a.claim_outbox(age, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].id.as_str(), &claimed[0].outbox), ("x", &doc.outbox));
    assert_eq!(claimed[0].vectors, doc.vectors);
    // Claimed now: another instance leaves it alone for `age`.
    assert!(b.claim_outbox(age, 10).await.unwrap().is_empty(), "a claim re-stamps the entry");
    tokio::time::sleep(age + Duration::from_millis(50)).await;
    assert_eq!(b.claim_outbox(age, 10).await.unwrap().len(), 1, "unconfirmed, it is handed out again");

    // `limit` bounds one claim.
    for id in ["y", "z"] {
        complete(&a, id).await;
    }
    assert_eq!(a.claim_outbox(Duration::ZERO, 2).await.unwrap().len(), 2);
    b.confirm(&[("x".into(), doc.outbox.unwrap())]).await.unwrap();
    tokio::time::sleep(age + Duration::from_millis(50)).await;
    let mut left: Vec<String> = a.claim_outbox(age, 10).await.unwrap().into_iter().map(|d| d.id).collect();
    left.sort();
    assert_eq!(left, ["y", "z"], "a confirmed entry is never handed out");
}

async fn take_orphans_takes_only_partials_older_than_the_age(kind: StateBackend) {
    let backend = Backend::start(kind).await;
    let store = backend.open().await;
    assert_persisted(merge_one(&store, one("old", TEXT, 0, meta(json!({"k": 1})))).await);
    let age = Duration::from_millis(300);
    assert!(store.take_orphans(age, 10).await.unwrap().is_empty());
    tokio::time::sleep(age + Duration::from_millis(50)).await;
    assert_persisted(merge_one(&store, one("young", IMAGE, 0, None)).await);
    let orphans = store.take_orphans(age, 10).await.unwrap();
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    assert_eq!(orphans[0].id, "old");
    assert_eq!(orphans[0].vectors, vec![Some(part_vector("old", TEXT, 0)), None]);
    assert_eq!(orphans[0].metadata.clone().map(Value::Object), Some(json!({"k": 1})));
    assert_eq!(store.inspect("old").await.unwrap().partial, 0, "taken means removed");
    assert_eq!(store.inspect("young").await.unwrap().partial, 0b10);
    assert!(store.take_orphans(age, 10).await.unwrap().is_empty(), "taken once");
    // Its first part is gone: the second part alone does not complete it.
    assert_persisted(merge_one(&store, one("old", IMAGE, 0, None)).await);
}

async fn dead_letters_are_appended(kind: StateBackend) {
    let backend = Backend::start(kind).await;
    let store = backend.open().await;
    let letter = |id: &str| DeadLetter {
        id: id.into(),
        status: Some(400),
        error_type: "mapper_parsing_exception".into(),
        reason: format!("{id} refused"),
        attempts: 1,
        document: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
        at: SystemTime::now(),
    };
    store.dead_letter(&[letter("a")]).await.unwrap();
    store.dead_letter(&[letter("b"), letter("c")]).await.unwrap();
    let letters = backend.dead_letters(&store).await;
    let ids: Vec<&str> = letters.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(letters[1]["document"], json!({"id": "b"}));
    assert_eq!((letters[1]["status"].as_u64(), letters[1]["reason"].as_str()), (Some(400), Some("b refused")));
}

macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(embedjoin::config::StateBackend::Redis).await
                }
            )*
        }
        mod on_embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(embedjoin::config::StateBackend::Embedded).await
                }
            )*
        }
    };
}

for_each_backend!(
    merge_persists_then_completes_exactly_once,
    later_parts_replace_earlier_ones,
    metadata_merges_in_slot_order,
    outbox_confirm_needs_the_right_token,
    claim_outbox_hands_out_old_entries_and_restamps_them,
    take_orphans_takes_only_partials_older_than_the_age,
    dead_letters_are_appended,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_data_survives_reopening() {
    let backend = Backend::start(StateBackend::Embedded).await;
    let store = backend.open().await;
    assert_persisted(merge_one(&store, one("partial", TEXT, 0, meta(json!({"k": "v"})))).await);
    let token = complete(&store, "done").await.outbox.unwrap();
    store
        .dead_letter(&[DeadLetter {
            id: "dead".into(),
            status: None,
            error_type: "incomplete".into(),
            reason: "test".into(),
            attempts: 0,
            document: Bytes::from_static(b"{}"),
            at: SystemTime::now(),
        }])
        .await
        .unwrap();
    drop(store);

    let store = backend.open().await;
    assert_eq!(store.inspect("partial").await.unwrap().partial, 0b01);
    let doc = completed(merge_one(&store, one("partial", IMAGE, 0, None)).await);
    assert_eq!(doc.vectors, vec![part_vector("partial", TEXT, 0), part_vector("partial", IMAGE, 0)]);
    assert_eq!(doc.metadata.map(Value::Object), Some(json!({"k": "v"})));
    let resent = store.claim_outbox(Duration::ZERO, 10).await.unwrap();
    let done = resent.iter().find(|d| d.id == "done").expect("the unconfirmed completion is still there");
    assert_eq!(done.outbox.as_deref(), Some(token.as_str()));
    assert_eq!(backend.dead_letters(&store).await.len(), 1);
    // Tokens of the new open differ from the old one's.
    assert_ne!(doc.outbox.unwrap(), token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_file_is_opened_once() {
    let backend = Backend::start(StateBackend::Embedded).await;
    let _store = backend.open().await;
    let again = StateStore::connect(&backend.settings, &backend.schema).await;
    let error = again.err().expect("a second open of the same file fails").to_string();
    assert!(error.contains("embedjoin.db"), "the error names the file: {error}");
}
