//! The state store contract, run against every backend: a real `redis-server`, a real
//! Redis Cluster of three masters, and the embedded store in a temporary directory. "Two
//! stores" are two connections to one Redis (or cluster), or two handles of one embedded
//! store (a store file is opened once per process).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use embedjoin::config::{LatePartsAction, StateBackend};
use embedjoin::model::document::{Origin, OrphanKind, Partial};
use embedjoin::model::{stamp, Document, Metadata, Schema};
use embedjoin::state::{Completion, DeadLetter, MergeOutcome, StateStore, StoredItem, Swept};
use embedjoin::Settings;
use serde_json::{json, Value};

use crate::support::data::vector;
use crate::support::redis_cluster::RedisCluster;
use crate::support::redis_server::RedisServer;

const TEXT: usize = 0;
const IMAGE: usize = 1;
/// The two default parts, small: the contract does not depend on the size.
const DIMS: [usize; 2] = [4, 6];

/// Which backend a contract test runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Redis,
    Cluster,
    Embedded,
}

/// One backend instance for one test.
struct Backend {
    settings: Settings,
    schema: Schema,
    redis: Option<RedisServer>,
    /// The cluster the tests share, each under its own key prefix.
    cluster: Option<&'static RedisCluster>,
    _dir: tempfile::TempDir,
}

/// One cluster for every contract test (started once, on a thread of its own that lives
/// as long as the test process, whose nodes die with it).
fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: std::sync::OnceLock<&'static RedisCluster> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let cluster: &'static RedisCluster = Box::leak(Box::new(runtime.block_on(RedisCluster::start(3, 0))));
            tx.send(cluster).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("the shared cluster starts")
    })
}

impl Backend {
    async fn start(kind: Kind) -> Backend {
        let mut settings = Settings::defaults();
        settings.parts[TEXT].dims = DIMS[TEXT];
        settings.parts[IMAGE].dims = DIMS[IMAGE];
        settings.state.backend = if kind == Kind::Embedded { StateBackend::Embedded } else { StateBackend::Redis };
        let dir = tempfile::tempdir().unwrap();
        settings.embedded.path = dir.path().join("state").join("embedjoin.db");
        let (mut redis, mut cluster) = (None, None);
        match kind {
            Kind::Redis => {
                let server = RedisServer::start().await;
                settings.redis.url = server.url();
                redis = Some(server);
            }
            Kind::Cluster => {
                let shared = tokio::task::spawn_blocking(shared_cluster).await.unwrap();
                settings.redis.cluster_nodes = shared.seeds();
                settings.redis.key_prefix = format!("contract-{:x}:", rand::random::<u64>());
                cluster = Some(shared);
            }
            Kind::Embedded => {}
        }
        let schema = Schema::new(&settings.parts);
        Backend { settings, schema, redis, cluster, _dir: dir }
    }

    async fn open(&self) -> StateStore {
        StateStore::connect(&self.settings, &self.schema).await.expect("the store opens")
    }

    /// Two stores on this backend, as two instances of the service would have.
    async fn two_stores(&self) -> (StateStore, StateStore) {
        let a = self.open().await;
        let b = match a {
            StateStore::Redis(_) => self.open().await,
            StateStore::Embedded(_) => a.clone(),
        };
        (a, b)
    }

    /// Every dead letter, oldest first, as JSON.
    async fn dead_letters(&self, store: &StateStore) -> Vec<Value> {
        let key = format!("{}{}", self.settings.redis.key_prefix, self.settings.redis.dead_letter_key);
        let lrange = redis::cmd("LRANGE").arg(key).arg(0).arg(-1).clone();
        let raw: Vec<Vec<u8>> = match (&self.redis, self.cluster, store) {
            (Some(redis), _, _) => lrange.query_async(&mut redis.connection().await).await.unwrap(),
            (_, Some(cluster), _) => lrange.query_async(&mut cluster.connection().await).await.unwrap(),
            (None, None, StateStore::Embedded(s)) => s.dead_letters().await.unwrap(),
            _ => unreachable!("an embedded backend opens an embedded store"),
        };
        raw.iter().map(|j| serde_json::from_slice(j).expect("a dead letter is JSON")).collect()
    }
}

fn part_vector(id: &str, slot: usize, copy: u32) -> Vec<f32> {
    vector(id, ["TEXT", "IMAGE"][slot], DIMS[slot], copy)
}

fn meta(value: Value) -> Option<Metadata> {
    value.as_object().cloned()
}

/// A partial holding one part: copy number `copy`, stamped now (newer than any before).
fn one(id: &str, slot: usize, copy: u32, metadata: Option<Metadata>) -> (String, Partial) {
    one_at(id, slot, copy, stamp::next(), metadata)
}

/// A partial holding one part with a given stamp.
fn one_at(id: &str, slot: usize, copy: u32, stamp: u64, metadata: Option<Metadata>) -> (String, Partial) {
    let mut p = Partial::new(2, std::time::Instant::now());
    p.vectors[slot] = Some(part_vector(id, slot, copy));
    p.metadata[slot] = metadata;
    p.stamps[slot] = stamp;
    (id.to_owned(), p)
}

const LEASE: Duration = Duration::from_secs(30);

async fn merge_one(store: &StateStore, partial: (String, Partial)) -> MergeOutcome {
    merge_leased(store, partial, LEASE).await
}

async fn merge_leased(store: &StateStore, partial: (String, Partial), lease: Duration) -> MergeOutcome {
    let mut outcomes = store.merge(&[partial], lease).await.expect("the merge runs");
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

fn found(swept: Vec<Swept>) -> Vec<Document> {
    swept
        .into_iter()
        .map(|s| match s {
            Swept::Found(doc) => doc,
            other => panic!("expected a readable entry, got {other:?}"),
        })
        .collect()
}

async fn merge_persists_then_completes_exactly_once(kind: Kind) {
    let backend = Backend::start(kind).await;
    let (a, b) = backend.two_stores().await;
    assert_persisted(merge_one(&a, one("x", TEXT, 0, None)).await);
    assert_eq!(a.inspect("x").await.unwrap().partial, 0b01);
    let doc = completed(merge_one(&b, one("x", IMAGE, 0, None)).await);
    assert_eq!(doc.id, "x");
    assert_eq!(doc.vectors, vec![part_vector("x", TEXT, 0), part_vector("x", IMAGE, 0)]);
    assert_eq!(doc.origin, Origin::Outbox);
    assert_eq!(doc.version(), doc.stamps[IMAGE], "the version is the newest part's stamp");
    let stored = a.inspect("x").await.unwrap();
    assert_eq!((stored.partial, stored.in_outbox, stored.completed), (0, true, Some(doc.version())));
    // A newer part arriving after completion, while the completion waits in the outbox:
    // the completion takes it in (late_parts = "update", the default); it never completes
    // again by itself.
    let again = completed(merge_one(&a, one("x", IMAGE, 1, None)).await);
    assert!(!again.update, "still the whole document");
    assert_eq!(again.vectors, vec![part_vector("x", TEXT, 0), part_vector("x", IMAGE, 1)]);
    assert!(again.version() > doc.version());
    assert_eq!(a.inspect("x").await.unwrap().partial, 0);

    // Both parts of 100 items through two stores at once: each completes exactly once.
    let ids: Vec<String> = (0..100).map(|i| format!("sku-{i}")).collect();
    let texts: Vec<_> = ids.iter().map(|id| one(id, TEXT, 0, None)).collect();
    let images: Vec<_> = ids.iter().map(|id| one(id, IMAGE, 0, None)).collect();
    let (ta, tb) = tokio::join!(a.merge(&texts, LEASE), b.merge(&images, LEASE));
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

async fn the_newest_copy_wins_whatever_order_merges_arrive_in(kind: Kind) {
    let backend = Backend::start(kind).await;
    let (a, b) = backend.two_stores().await;
    let (older, newer) = (stamp::next(), stamp::next());
    // The newer copy reaches the store first (another instance flushed sooner).
    assert_persisted(merge_one(&a, one_at("x", TEXT, 2, newer, meta(json!({"v": 2})))).await);
    assert_persisted(merge_one(&b, one_at("x", TEXT, 1, older, meta(json!({"v": 1})))).await);
    let doc = completed(merge_one(&a, one("x", IMAGE, 0, None)).await);
    assert_eq!(doc.vectors[TEXT], part_vector("x", TEXT, 2));
    assert_eq!(doc.stamps[TEXT], newer);
    assert_eq!(doc.metadata.map(Value::Object), Some(json!({"v": 2})), "metadata belongs to its copy");
}

async fn a_copys_metadata_goes_with_it_and_merges_in_slot_order(kind: Kind) {
    let backend = Backend::start(kind).await;
    let store = backend.open().await;
    let image_first = one("x", IMAGE, 0, meta(json!({"title": "image", "w": 3})));
    assert_persisted(merge_one(&store, image_first).await);
    let doc = completed(merge_one(&store, one("x", TEXT, 0, meta(json!({"title": "text", "lang": "en"})))).await);
    // Slot order, not arrival order: the image part's slot comes later and wins.
    assert_eq!(doc.metadata.map(Value::Object), Some(json!({"title": "image", "lang": "en", "w": 3})));

    // A part sent again without metadata replaces the copy, metadata included (as memory does).
    assert_persisted(merge_one(&store, one("y", TEXT, 0, meta(json!({"lang": "fr"})))).await);
    assert_persisted(merge_one(&store, one("y", TEXT, 1, None)).await);
    let doc = completed(merge_one(&store, one("y", IMAGE, 0, None)).await);
    assert_eq!(doc.metadata, None);
}

async fn a_merge_applied_again_after_a_lost_reply_changes_nothing(kind: Kind) {
    let backend = Backend::start(kind).await;
    let store = backend.open().await;
    let text = one("x", TEXT, 0, None);
    let image = one("x", IMAGE, 0, None);
    let again = (image.0.clone(), Partial { acks: Vec::new(), ..clone_partial(&image.1) });
    assert_persisted(merge_one(&store, text).await);
    let doc = completed(merge_one(&store, image).await);
    // The reply was lost: the caller merges the same copy again.
    assert_persisted(merge_one(&store, again).await);
    let stored = store.inspect("x").await.unwrap();
    assert_eq!((stored.partial, stored.in_outbox, stored.completed), (0, true, Some(doc.version())));
    store.renew(&["x".to_owned()], Duration::ZERO).await.unwrap();
    let waiting = found(store.claim_outbox(LEASE, 10).await.unwrap());
    assert_eq!(waiting.len(), 1, "one completion, no orphan");
    assert_eq!(waiting[0].version(), doc.version());
    // An older copy after completion changes nothing either.
    let old = one_at("x", TEXT, 9, doc.stamps[TEXT] - 1, None);
    assert_persisted(merge_one(&store, old).await);
    assert_eq!(store.inspect("x").await.unwrap().partial, 0, "an older copy never revives the item");
}

fn clone_partial(p: &Partial) -> Partial {
    let mut c = Partial::new(p.vectors.len(), p.received_at);
    c.vectors = p.vectors.clone();
    c.metadata = p.metadata.clone();
    c.stamps = p.stamps.clone();
    c
}

async fn a_completion_in_memory_drops_older_stored_copies(kind: Kind) {
    let mut backend = Backend::start(kind).await;
    backend.settings.state.late_parts = LatePartsAction::NewItem; // a newer copy waits
    let (a, b) = backend.two_stores().await;
    // Issue scenario: TEXT v1 stored; then TEXT v2 + IMAGE complete in memory elsewhere.
    assert_persisted(merge_one(&a, one("x", TEXT, 1, None)).await);
    let stamps = vec![stamp::next(), stamp::next()];
    b.remember(&[Completion { id: "x".into(), stamps: stamps.clone() }]).await.unwrap();
    let stored = a.inspect("x").await.unwrap();
    assert_eq!((stored.partial, stored.completed), (0, Some(stamps[IMAGE])), "no stale copy stays behind");
    // IMAGE again (newer): it waits for a newer TEXT; the stale v1 never comes back.
    assert_persisted(merge_one(&a, one("x", IMAGE, 2, None)).await);
    assert_eq!(a.inspect("x").await.unwrap().partial, 0b10);

    // A stored copy newer than the completed one stays: it came after.
    assert_persisted(merge_one(&a, one("y", TEXT, 3, None)).await);
    let completed_stamps = vec![stamp::next(), stamp::next()];
    b.remember(&[Completion { id: "y".into(), stamps: completed_stamps }]).await.unwrap();
    let stored = a.inspect("y").await.unwrap();
    assert_eq!(stored.partial, 0, "older than the completion: dropped");
    assert_persisted(merge_one(&a, one("z", TEXT, 3, None)).await);
    let older = vec![1, 2];
    b.remember(&[Completion { id: "z".into(), stamps: older }]).await.unwrap();
    assert_eq!(a.inspect("z").await.unwrap().partial, 0b01, "newer than the completion: kept");
}

async fn settling_a_version_removes_it_and_older_entries_only(kind: Kind) {
    let mut backend = Backend::start(kind).await;
    backend.settings.state.late_parts = LatePartsAction::NewItem; // completions again and again
    let (a, b) = backend.two_stores().await;
    let doc = complete(&a, "x").await;
    b.confirm(&[("x".into(), doc.version() - 1)]).await.unwrap();
    assert!(a.inspect("x").await.unwrap().in_outbox, "an older version leaves the entry");
    // A newer completion replaces the entry: settling the older one leaves it.
    let newer = complete(&a, "x").await;
    assert!(newer.version() > doc.version());
    b.confirm(&[("x".into(), doc.version())]).await.unwrap();
    assert!(a.inspect("x").await.unwrap().in_outbox, "the older version leaves the newer entry");
    b.confirm(&[("x".into(), newer.version())]).await.unwrap();
    assert!(!a.inspect("x").await.unwrap().in_outbox);
    // A newer version settled (a 409 told us the index has it) removes an older entry too.
    let third = complete(&a, "x").await;
    b.confirm(&[("x".into(), third.version() + 1)]).await.unwrap();
    assert!(!a.inspect("x").await.unwrap().in_outbox);
    b.renew(&["x".into()], Duration::ZERO).await.unwrap();
    assert!(a.claim_outbox(LEASE, 10).await.unwrap().is_empty(), "nothing left to resend");
}

async fn an_outbox_entry_is_resent_only_after_its_lease_lapses(kind: Kind) {
    let backend = Backend::start(kind).await;
    let (a, b) = backend.two_stores().await;
    let lease = Duration::from_millis(300);
    assert_persisted(merge_leased(&a, one("x", TEXT, 0, None), lease).await);
    let doc = completed(merge_leased(&a, one("x", IMAGE, 0, None), lease).await);
    assert!(b.claim_outbox(lease, 10).await.unwrap().is_empty(), "leased to the completing caller");
    // Renewed while its delivery is alive: still not handed out.
    tokio::time::sleep(lease / 2).await;
    a.renew(&["x".into()], lease).await.unwrap();
    tokio::time::sleep(lease / 2 + Duration::from_millis(50)).await;
    assert!(b.claim_outbox(lease, 10).await.unwrap().is_empty(), "a renewed lease holds");
    tokio::time::sleep(lease).await;
    let claimed = found(b.claim_outbox(lease, 10).await.unwrap());
    assert_eq!(claimed.len(), 1, "a lapsed lease is handed out");
    assert_eq!((claimed[0].id.as_str(), claimed[0].version()), ("x", doc.version()));
    assert_eq!(claimed[0].vectors, doc.vectors);
    assert!(a.claim_outbox(lease, 10).await.unwrap().is_empty(), "claimed: leased to the claimer");
    // Released (shutdown): handed out at once.
    b.renew(&["x".into()], Duration::ZERO).await.unwrap();
    assert_eq!(a.claim_outbox(lease, 10).await.unwrap().len(), 1);

    // `limit` bounds one claim.
    for id in ["y", "z"] {
        complete(&a, id).await;
    }
    a.renew(&["y".into(), "z".into()], Duration::ZERO).await.unwrap();
    a.confirm(&[("x".into(), doc.version())]).await.unwrap();
    assert_eq!(a.claim_outbox(lease, 1).await.unwrap().len(), 1);
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let mut left: Vec<String> = found(a.claim_outbox(lease, 10).await.unwrap()).into_iter().map(|d| d.id).collect();
    left.sort();
    assert_eq!(left, ["y", "z"], "a settled entry is never handed out");
}

async fn parked_documents_wait_in_the_outbox_due_at_once(kind: Kind) {
    let backend = Backend::start(kind).await;
    let store = backend.open().await;
    let mut partial = one("m", TEXT, 0, meta(json!({"k": 1}))).1;
    let image = one("m", IMAGE, 0, None).1;
    partial.vectors[IMAGE] = image.vectors[IMAGE].clone();
    partial.stamps[IMAGE] = image.stamps[IMAGE];
    let doc = partial.into_document("m".into());
    store.park(std::slice::from_ref(&doc)).await.unwrap();
    let claimed = found(store.claim_outbox(LEASE, 10).await.unwrap());
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].vectors.clone(), claimed[0].version()), (doc.vectors.clone(), doc.version()));
    assert_eq!(claimed[0].metadata.clone().map(Value::Object), Some(json!({"k": 1})));
    // An older version parked later never replaces a newer entry.
    let mut older = doc.clone();
    older.stamps = vec![1, 1];
    store.park(&[older]).await.unwrap();
    store.renew(&["m".into()], Duration::ZERO).await.unwrap();
    assert_eq!(found(store.claim_outbox(LEASE, 10).await.unwrap())[0].version(), doc.version());
}

async fn the_orphan_sweep_takes_only_old_incomplete_items(kind: Kind) {
    let backend = Backend::start(kind).await;
    let store = backend.open().await;
    assert_persisted(merge_one(&store, one("old", TEXT, 0, meta(json!({"k": 1})))).await);
    assert_persisted(merge_one(&store, one("done", TEXT, 0, None)).await);
    let age = Duration::from_millis(300);
    assert!(store.sweep_orphans(age, 10, None).await.unwrap().is_empty());
    tokio::time::sleep(age + Duration::from_millis(50)).await;
    completed(merge_one(&store, one("done", IMAGE, 0, None)).await);
    assert_persisted(merge_one(&store, one("young", IMAGE, 0, None)).await);
    let orphans = found(store.sweep_orphans(age, 10, None).await.unwrap());
    assert_eq!(orphans.len(), 1, "never a completed or young item: {orphans:?}");
    assert_eq!(orphans[0].id, "old");
    assert_eq!(orphans[0].orphan, Some(OrphanKind::Partial));
    assert_eq!(orphans[0].vectors, vec![part_vector("old", TEXT, 0), vec![]]);
    assert_eq!(orphans[0].metadata.clone().map(Value::Object), Some(json!({"k": 1})));
    assert_eq!(store.inspect("old").await.unwrap(), StoredItem::default(), "swept means removed");
    assert_eq!(store.inspect("young").await.unwrap().partial, 0b10);
    assert!(store.sweep_orphans(age, 10, None).await.unwrap().is_empty(), "swept once");
    // Its first part is gone: the second part alone does not complete it.
    assert_persisted(merge_one(&store, one("old", IMAGE, 0, None)).await);
}

async fn swept_orphans_to_deliver_go_through_the_outbox(kind: Kind) {
    let mut backend = Backend::start(kind).await;
    backend.settings.state.late_parts = LatePartsAction::NewItem; // a late part waits as a partial
    let store = backend.open().await;
    let done = complete(&store, "late").await;
    store.confirm(&[("late".into(), done.version())]).await.unwrap();
    assert_persisted(merge_one(&store, one("late", TEXT, 1, None)).await);
    assert_persisted(merge_one(&store, one("never", IMAGE, 0, None)).await);
    let age = Duration::from_millis(200);
    tokio::time::sleep(age + Duration::from_millis(50)).await;
    let lease = Duration::from_millis(300);
    let mut orphans = found(store.sweep_orphans(age, 10, Some(lease)).await.unwrap());
    orphans.sort_by(|a, b| a.id.cmp(&b.id));
    let kinds: Vec<(&str, Option<OrphanKind>)> = orphans.iter().map(|o| (o.id.as_str(), o.orphan)).collect();
    assert_eq!(kinds, [("late", Some(OrphanKind::Late)), ("never", Some(OrphanKind::Partial))]);
    assert!(orphans[0].version() > done.version(), "a late part is newer than the completion");
    let stored = store.inspect("late").await.unwrap();
    assert_eq!((stored.partial, stored.in_outbox, stored.completed), (0, true, Some(done.version())));
    assert!(store.claim_outbox(lease, 10).await.unwrap().is_empty(), "leased to the sweeper");
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let resent = found(store.claim_outbox(lease, 10).await.unwrap());
    assert_eq!(resent.len(), 2, "an unsettled orphan is resent like any document");
    assert!(resent.iter().all(|d| d.orphan.is_some()));
}

async fn later_copies_of_a_completed_item_update_its_document(kind: Kind) {
    let backend = Backend::start(kind).await;
    let (a, b) = backend.two_stores().await;
    let done = complete(&a, "x").await;
    a.confirm(&[("x".into(), done.version())]).await.unwrap();
    // A newer TEXT: an update of the indexed document, TEXT only, leased to the caller.
    let update = completed(merge_one(&b, one("x", TEXT, 1, meta(json!({"title": "new"})))).await);
    assert!(update.update && update.orphan.is_none());
    assert_eq!(update.vectors, vec![part_vector("x", TEXT, 1), vec![]]);
    assert_eq!(update.metadata.clone().map(Value::Object), Some(json!({"title": "new"})));
    assert_eq!(update.version(), update.stamps[TEXT]);
    let stored = a.inspect("x").await.unwrap();
    assert_eq!((stored.partial, stored.in_outbox, stored.completed), (0, true, Some(done.version())));
    assert!(a.claim_outbox(LEASE, 10).await.unwrap().is_empty(), "leased to the caller");
    // The same copy again (a lost reply), or an older one: nothing.
    let older = one_at("x", TEXT, 7, update.stamps[TEXT] - 1, None);
    assert_persisted(merge_one(&a, older).await);
    let (_, mut same) = one("x", TEXT, 1, None);
    same.stamps[TEXT] = update.stamps[TEXT];
    assert_persisted(merge_one(&a, ("x".into(), same)).await);
    // A newer IMAGE while the update waits: the update takes it in.
    let both = completed(merge_one(&a, one("x", IMAGE, 2, None)).await);
    assert!(both.update);
    assert_eq!(both.vectors, vec![part_vector("x", TEXT, 1), part_vector("x", IMAGE, 2)]);
    assert!(both.version() > update.version());
    // Settling the first update leaves the newer one; settling that one leaves the record.
    b.confirm(&[("x".into(), update.version())]).await.unwrap();
    assert!(a.inspect("x").await.unwrap().in_outbox);
    b.confirm(&[("x".into(), both.version())]).await.unwrap();
    let stored = a.inspect("x").await.unwrap();
    assert_eq!((stored.partial, stored.in_outbox, stored.completed), (0, false, Some(done.version())));

    // The document of an update is gone from the index: reopened, its parts wait as a new
    // item's, which completes again with a partner.
    let z = complete(&a, "z").await;
    a.confirm(&[("z".into(), z.version())]).await.unwrap();
    let lonely = completed(merge_one(&a, one("z", TEXT, 5, None)).await);
    b.reopen(&[("z".into(), lonely.version() - 1)]).await.unwrap();
    assert!(a.inspect("z").await.unwrap().in_outbox, "an older version reopens nothing");
    b.reopen(&[("z".into(), lonely.version())]).await.unwrap();
    let stored = a.inspect("z").await.unwrap();
    assert_eq!((stored.partial, stored.in_outbox, stored.completed), (0b01, false, None));
    let again = completed(merge_one(&a, one("z", IMAGE, 6, None)).await);
    assert!(!again.update);
    assert_eq!(again.vectors, vec![part_vector("z", TEXT, 5), part_vector("z", IMAGE, 6)]);

    // A copy stored before a completion in memory was recorded, and newer than it: it
    // updates that completion's document, due at once.
    assert_persisted(merge_one(&a, one("y", TEXT, 3, None)).await);
    b.remember(&[Completion { id: "y".into(), stamps: vec![1, 2] }]).await.unwrap();
    let stored = a.inspect("y").await.unwrap();
    assert_eq!((stored.partial, stored.in_outbox), (0, true));
    let due = found(a.claim_outbox(LEASE, 10).await.unwrap());
    assert_eq!(due.len(), 1);
    assert!(due[0].update);
    assert_eq!(due[0].vectors, vec![part_vector("y", TEXT, 3), vec![]]);
}

async fn a_completion_is_forgotten_after_remember_completed(kind: Kind) {
    let mut backend = Backend::start(kind).await;
    backend.settings.state.remember_completed = Duration::from_millis(300);
    let store = backend.open().await;
    let stale_stamp = stamp::next(); // before the completion
    let stale = || one_at("x", TEXT, 9, stale_stamp, None);
    let done = complete(&store, "x").await;
    store.confirm(&[("x".into(), done.version())]).await.unwrap();
    assert_eq!(store.inspect("x").await.unwrap().completed, Some(done.version()));
    assert_persisted(merge_one(&store, stale()).await);
    assert_eq!(store.inspect("x").await.unwrap().partial, 0, "remembered: the stale copy changes nothing");
    // Forgotten once remember_completed has passed, at the latest by the next sweep.
    tokio::time::sleep(Duration::from_millis(350)).await;
    store.sweep_orphans(Duration::from_secs(3600), 10, None).await.unwrap();
    assert_eq!(store.inspect("x").await.unwrap().completed, None, "forgotten");
    assert_persisted(merge_one(&store, stale()).await);
    assert_eq!(store.inspect("x").await.unwrap().partial, 0b01, "not remembered: a copy starts a new item");
}

async fn dead_letters_are_appended(kind: Kind) {
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
        version: None,
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
                    super::$test(super::Kind::Redis).await
                }
            )*
        }
        mod on_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Kind::Cluster).await
                }
            )*
        }
        mod on_embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Kind::Embedded).await
                }
            )*
        }
    };
}

for_each_backend!(
    merge_persists_then_completes_exactly_once,
    the_newest_copy_wins_whatever_order_merges_arrive_in,
    a_copys_metadata_goes_with_it_and_merges_in_slot_order,
    a_merge_applied_again_after_a_lost_reply_changes_nothing,
    a_completion_in_memory_drops_older_stored_copies,
    settling_a_version_removes_it_and_older_entries_only,
    an_outbox_entry_is_resent_only_after_its_lease_lapses,
    parked_documents_wait_in_the_outbox_due_at_once,
    the_orphan_sweep_takes_only_old_incomplete_items,
    swept_orphans_to_deliver_go_through_the_outbox,
    later_copies_of_a_completed_item_update_its_document,
    a_completion_is_forgotten_after_remember_completed,
    dead_letters_are_appended,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_data_survives_reopening() {
    let backend = Backend::start(Kind::Embedded).await;
    let store = backend.open().await;
    assert_persisted(merge_one(&store, one("partial", TEXT, 0, meta(json!({"k": "v"})))).await);
    let first = complete(&store, "done").await;
    store
        .dead_letter(&[DeadLetter {
            id: "dead".into(),
            status: None,
            error_type: "incomplete".into(),
            reason: "test".into(),
            attempts: 0,
            document: Bytes::from_static(b"{}"),
            at: SystemTime::now(),
            version: None,
        }])
        .await
        .unwrap();
    drop(store);

    let store = backend.open().await;
    assert_eq!(store.inspect("partial").await.unwrap().partial, 0b01);
    let doc = completed(merge_one(&store, one("partial", IMAGE, 0, None)).await);
    assert_eq!(doc.vectors, vec![part_vector("partial", TEXT, 0), part_vector("partial", IMAGE, 0)]);
    assert_eq!(doc.metadata.clone().map(Value::Object), Some(json!({"k": "v"})));
    store.renew(&["done".into()], Duration::ZERO).await.unwrap();
    let resent = found(store.claim_outbox(LEASE, 10).await.unwrap());
    let done = resent.iter().find(|d| d.id == "done").expect("the unsettled completion is still there");
    assert_eq!((done.version(), &done.vectors), (first.version(), &first.vectors));
    assert_eq!(backend.dead_letters(&store).await.len(), 1);
    assert!(doc.version() > first.version());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_store_file_is_opened_once() {
    let backend = Backend::start(Kind::Embedded).await;
    let _store = backend.open().await;
    let again = StateStore::connect(&backend.settings, &backend.schema).await;
    let error = again.err().expect("a second open of the same file fails").to_string();
    assert!(error.contains("embedjoin.db"), "the error names the file: {error}");
}

/// What an embedjoin from before virtual buckets left in Redis is moved into them when a
/// store connects: a waiting part, an unsettled outbox entry and a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_layout_before_buckets_is_migrated_at_connect() {
    let backend = Backend::start(Kind::Redis).await;
    let mut conn = backend.redis.as_ref().unwrap().connection().await;
    // A record, as the old layout kept it: written by a store, then moved to an old hash.
    let store = backend.open().await;
    let done = complete(&store, "z").await;
    store.confirm(&[("z".into(), done.version())]).await.unwrap();
    let StateStore::Redis(redis_store) = &store else { unreachable!() };
    let record_key = redis_store.keys().record(redis_store.keys().bucket("z"), "z");
    let record: Vec<u8> = redis::cmd("HGET").arg(&record_key).arg("z").query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    drop(store);
    let old = |cmd: &mut redis::Cmd| cmd.clone();
    let text = one("x", TEXT, 0, meta(json!({"k": 1}))).1;
    let image = one("y", IMAGE, 0, None).1;
    let y_text = one("y", TEXT, 0, None).1;
    let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let mut pipe = redis::pipe();
    pipe.add_command(old(redis::cmd("HSET")
        .arg("embedjoin:{x}")
        .arg("EMBEDDINGS_TEXT")
        .arg(bytes(text.vectors[TEXT].as_ref().unwrap()))))
        .add_command(old(redis::cmd("HSET")
            .arg("embedjoin:{x}")
            .arg("s:EMBEDDINGS_TEXT")
            .arg(text.stamps[TEXT])
            .arg("m:EMBEDDINGS_TEXT")
            .arg(r#"{"k":1}"#)))
        .add_command(old(redis::cmd("ZADD").arg("embedjoin:partials").arg(1).arg("x")))
        .add_command(old(redis::cmd("HSET")
            .arg("embedjoin:outbox:{y}")
            .arg("EMBEDDINGS_TEXT")
            .arg(bytes(y_text.vectors[TEXT].as_ref().unwrap()))
            .arg("s:EMBEDDINGS_TEXT")
            .arg(y_text.stamps[TEXT])
            .arg("EMBEDDINGS_IMAGE")
            .arg(bytes(image.vectors[IMAGE].as_ref().unwrap()))
            .arg("s:EMBEDDINGS_IMAGE")
            .arg(image.stamps[IMAGE])
            .arg("_v")
            .arg(y_text.stamps[TEXT].max(image.stamps[IMAGE]))))
        .add_command(old(redis::cmd("ZADD").arg("embedjoin:outbox").arg(1).arg("y")))
        .add_command(old(redis::cmd("HSET").arg("embedjoin:records:{77}").arg("z").arg(record)))
        .add_command(old(redis::cmd("SET").arg("embedjoin:epoch").arg("old")));
    let _: () = pipe.query_async(&mut conn).await.unwrap();

    let store = backend.open().await;
    assert_eq!(store.inspect("x").await.unwrap().partial, 0b01, "the waiting part moved");
    assert_eq!(store.inspect("z").await.unwrap().completed, Some(done.version()), "the record moved");
    let resent = found(store.claim_outbox(LEASE, 10).await.unwrap());
    assert_eq!(resent.len(), 1, "the outbox entry moved, due at once");
    assert_eq!((resent[0].id.as_str(), resent[0].version()), ("y", y_text.stamps[TEXT].max(image.stamps[IMAGE])));
    assert_eq!(resent[0].vectors, vec![y_text.vectors[TEXT].clone().unwrap(), image.vectors[IMAGE].clone().unwrap()]);
    let doc = completed(merge_one(&store, one("x", IMAGE, 0, None)).await);
    assert_eq!(doc.metadata.map(Value::Object), Some(json!({"k": 1})));
    let mut old_keys: Vec<String> = redis::cmd("KEYS").arg("embedjoin:[^{]*").query_async(&mut conn).await.unwrap();
    old_keys.retain(|k| k != "embedjoin:layout"); // the new layout's marker
    assert_eq!(old_keys, Vec::<String>::new(), "nothing of the old layout is left");
}

/// Two instances split the maintenance's buckets, each visiting its own; when one stops
/// (it died), the other takes its buckets once their leases lapse.
async fn maintenance_is_split_between_instances_and_handed_on(kind: Kind) {
    let backend = Backend::start(kind).await;
    let (a, b) = backend.two_stores().await;
    let round = Duration::from_millis(200);
    let (mut held_a, mut held_b) = (0, 0);
    for _ in 0..4 {
        held_a = a.take_share(round).await.unwrap();
        held_b = b.take_share(round).await.unwrap();
    }
    assert_eq!((held_a, held_b), (8, 8), "two instances hold half the ranges each");
    let ids: Vec<String> = (0..40).map(|i| format!("k-{i}")).collect();
    for id in &ids {
        assert_persisted(merge_leased(&a, one(id, TEXT, 0, None), Duration::ZERO).await);
        completed(merge_leased(&a, one(id, IMAGE, 0, None), Duration::ZERO).await);
    }
    let by_a = found(a.claim_outbox(LEASE, 100).await.unwrap());
    let by_b = found(b.claim_outbox(LEASE, 100).await.unwrap());
    assert!(!by_a.is_empty() && !by_b.is_empty(), "each resends the entries of its buckets");
    assert_eq!(by_a.len() + by_b.len(), ids.len(), "between them, every lapsed entry");
    // `a` stops: `b` takes its ranges once their leases lapse (a few rounds).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.take_share(round).await.unwrap() < 16 {
        assert!(std::time::Instant::now() < deadline, "the ranges of a stopped instance are taken over");
        tokio::time::sleep(round).await;
    }
    b.renew(&ids, Duration::ZERO).await.unwrap();
    assert_eq!(found(b.claim_outbox(LEASE, 100).await.unwrap()).len(), ids.len(), "b visits every bucket now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_is_split_between_instances_and_handed_on_redis() {
    maintenance_is_split_between_instances_and_handed_on(Kind::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_is_split_between_instances_and_handed_on_cluster() {
    maintenance_is_split_between_instances_and_handed_on(Kind::Cluster).await
}

/// A master that forgot the scripts (restarted, or a replica promoted since they were
/// loaded) is given them again: every call still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masters_that_forgot_the_scripts_get_them_again_on_a_cluster() {
    let backend = Backend::start(Kind::Cluster).await;
    let store = backend.open().await;
    let ids: Vec<String> = (0..30).map(|i| format!("s-{i}")).collect();
    let texts: Vec<_> = ids.iter().map(|id| one(id, TEXT, 0, None)).collect();
    for outcome in store.merge(&texts, LEASE).await.unwrap() {
        assert_persisted(outcome);
    }
    for port in backend.cluster.unwrap().masters().await {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.unwrap();
    }
    let images: Vec<_> = ids.iter().map(|id| one(id, IMAGE, 0, None)).collect();
    let done = store.merge(&images, LEASE).await.unwrap();
    assert!(done.iter().all(|o| matches!(o, MergeOutcome::Completed(_))), "{done:?}");
}

/// Data written with one number of buckets is never read with another: the store refuses
/// to connect, and says which setting to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refuses_data_written_with_another_number_of_buckets() {
    let mut backend = Backend::start(Kind::Redis).await;
    let _first = backend.open().await;
    backend.settings.redis.buckets = 512;
    let error = StateStore::connect(&backend.settings, &backend.schema).await.err().expect("refused").to_string();
    assert!(error.contains("buckets=1024") && error.contains("redis.buckets is 512"), "{error}");
}
