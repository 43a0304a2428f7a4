//! embedjoin on a real Redis Cluster (three masters, started by the harness on free ports):
//! several instances share it, every script call stays in one slot, and a master killed
//! mid-load, with a replica to take over, costs a few 503s and nothing acknowledged.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::durability::{fully_acknowledged, shuffled_batches, start_load, until, Load};
use crate::end_to_end::assert_indexed_exactly;
use crate::instances::texts_to_one_images_to_the_other;
use crate::support::app::{cluster_settings, spawn_app, TestApp};
use crate::support::es::EsTarget;
use crate::support::redis_cluster::RedisCluster;
use crate::support::redis_server::key_role;

/// Keys on the node at `port`, by role (see [`key_role`]).
async fn roles_on(port: u16) -> Vec<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("embedjoin:*").query_async(&mut conn).await.unwrap();
    keys.iter().map(|k| key_role(k).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_sent_to_two_instances_on_a_cluster_complete_exactly_once_spread_over_the_masters() {
    let (cluster, es) = (RedisCluster::start(3, 0).await, EsTarget::start().await);
    let a = spawn_app(cluster_settings(&cluster, &es)).await;
    let b = spawn_app(cluster_settings(&cluster, &es)).await;
    // Ids that name hash tags of their own must not move their keys out of their bucket.
    let ids: Vec<String> =
        (0..3_000).map(|i| if i % 10 == 0 { format!("{{c}}-{i}") } else { format!("c-{i}") }).collect();
    texts_to_one_images_to_the_other(&a, &b, &ids, 9).await;

    let writes = assert_indexed_exactly(&es, &ids).await;
    assert_eq!(writes, ids.len() as u64, "each item indexed once");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    // Nothing left but the records and markers; the records spread evenly over the masters.
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3);
    let mut records_per_master = Vec::new();
    for port in masters {
        let roles = roles_on(port).await;
        let left: Vec<&String> =
            roles.iter().filter(|r| !["epoch", "layout"].contains(&r.as_str()) && !r.starts_with("r:")).collect();
        assert!(left.is_empty(), "keys left on {port}: {left:?}");
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut records = 0usize;
        let record_hashes: Vec<String> =
            redis::cmd("KEYS").arg("embedjoin:{*}r:*").query_async(&mut conn).await.unwrap();
        for key in record_hashes {
            records += redis::cmd("HLEN").arg(&key).query_async::<usize>(&mut conn).await.unwrap();
        }
        records_per_master.push(records);
    }
    assert_eq!(records_per_master.iter().sum::<usize>(), ids.len(), "one record per item");
    for records in &records_per_master {
        let share = *records as f64 / ids.len() as f64;
        assert!((0.283..=0.383).contains(&share), "each master holds 33% ± 5% of the items: {records_per_master:?}");
    }
}

/// What a load saw when a master was killed under it.
struct Failover {
    /// Ids whose every part was acknowledged.
    complete: Vec<String>,
    batches: usize,
    acknowledged: usize,
    unavailable: usize,
    /// From the kill until a replica served the master's slots, and until the killed node
    /// was back (as a replica).
    promoted: Duration,
    rejoined: Duration,
}

/// Sends every part of `ids` to `app` (each batch until acknowledged), kills a master once
/// `fraction` of the batches were acknowledged, waits for its replica to take over, and
/// restarts it, as an operator would, as a replica (until then, the promoted master has
/// no replica: with `wait_replicas`, flushes that write there fail).
async fn kill_a_master_under_load(
    cluster: &mut RedisCluster,
    app: &TestApp,
    ids: &[String],
    fraction: f64,
) -> Failover {
    let batches = shuffled_batches(ids, 50, 5);
    let total = batches.len();
    let Load { task, acked, tally } =
        start_load(batches, 4, Arc::new(Mutex::new(app.address.clone())), Duration::from_secs(90));
    let wanted = (total as f64 * fraction) as usize;
    until(Duration::from_secs(120), "enough of the load acknowledged", || tally.lock().unwrap().acknowledged >= wanted)
        .await;
    let victim = cluster.masters().await[0];
    let killed_at = std::time::Instant::now();
    cluster.kill(victim);
    cluster.wait_for_failover(victim).await;
    let promoted = killed_at.elapsed();
    cluster.restart(victim).await;
    let rejoined = killed_at.elapsed();
    task.await.unwrap();
    let complete = fully_acknowledged(&acked.lock().unwrap(), ids);
    let tally = tally.lock().unwrap().clone();
    Failover {
        complete,
        batches: total,
        acknowledged: tally.acknowledged,
        unavailable: tally.unavailable,
        promoted,
        rejoined,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_load_loses_nothing_acknowledged_with_wait_replicas() {
    let (mut cluster, es) = (RedisCluster::start(3, 1).await, EsTarget::start().await);
    // The defaults, but for what this test is about.
    let mut settings = cluster_settings(&cluster, &es);
    settings.durability.ack = embedjoin::config::AckMode::Persisted;
    settings.redis.wait_replicas = 1;
    let app = spawn_app(settings).await;
    let ids: Vec<String> = (0..3_000).map(|i| format!("f-{i}")).collect();
    let run = kill_a_master_under_load(&mut cluster, &app, &ids, 1.0 / 3.0).await;
    assert_eq!(run.complete.len(), ids.len(), "every batch was acknowledged in the end");
    assert_indexed_exactly(&es, &run.complete).await;
    eprintln!(
        "master killed: replica promoted in {:?}, old master back as a replica in {:?}, batches {}, acknowledged {}, 503s seen {}, items indexed {}",
        run.promoted,
        run.rejoined,
        run.batches,
        run.acknowledged,
        run.unavailable,
        es.count().await
    );
    app.stop().await.unwrap();
}

/// A measurement, not a check: what a failover loses without `wait_replicas`, in each ack
/// mode. Run it with
/// `cargo test --test api -- --ignored cluster::what_a_failover_loses --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn what_a_failover_loses_without_wait_replicas() {
    for ack in [embedjoin::config::AckMode::Accepted, embedjoin::config::AckMode::Persisted] {
        let (mut cluster, es) = (RedisCluster::start(3, 1).await, EsTarget::start().await);
        let mut settings = cluster_settings(&cluster, &es);
        settings.durability.ack = ack;
        settings.redis.response_timeout = Duration::from_millis(500);
        settings.redis.connection_timeout = Duration::from_millis(300);
        // A completion whose reply the dead master never sent waits in the outbox until its
        // lease lapses: short here, so that "still missing" means lost.
        settings.durability.maintenance_interval = Duration::from_millis(500);
        settings.durability.outbox_resend_after = Duration::from_secs(2);
        let app = spawn_app(settings).await;
        let ids: Vec<String> = (0..20_000).map(|i| format!("l-{i}")).collect();
        let run = kill_a_master_under_load(&mut cluster, &app, &ids, 0.5).await;
        let complete = run.complete;
        // Indexed until the count stops moving for 5 s.
        let (mut count, mut still) = (es.count().await, std::time::Instant::now());
        while still.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = es.count().await;
            if now != count {
                (count, still) = (now, std::time::Instant::now());
            }
        }
        let docs = es.docs(&complete).await;
        let lost = complete.iter().filter(|id| !docs.contains_key(*id)).count();
        eprintln!(
            "ack {ack:?}, wait_replicas 0: {} items fully acknowledged, {lost} of them not indexed after the failover; {} 503s",
            complete.len(),
            run.unavailable
        );
        app.stop().await.unwrap();
    }
}

/// `embedjoin check` in cluster mode, seeds from the environment, with credentials: it
/// reports the masters and the slot coverage, and never prints the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_cluster_and_its_slot_coverage_without_printing_secrets() {
    let (cluster, es) = (RedisCluster::start(3, 0).await, EsTarget::start().await);
    let password = "cluster-s3cret-pw";
    for port in cluster.masters().await {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg(password).query_async(&mut conn).await.unwrap();
    }
    let seeds: Vec<String> =
        cluster.seeds().iter().map(|s| s.replace("redis://", &format!("redis://:{password}@"))).collect();
    let mut env: Vec<(&str, String)> = vec![
        ("EMBEDJOIN__STATE__BACKEND", "redis".into()),
        ("EMBEDJOIN__SINK__BACKEND", "elasticsearch".into()),
        ("EMBEDJOIN__REDIS__CLUSTER_NODES", seeds.join(",")),
        ("EMBEDJOIN__ELASTICSEARCH__URL", es.url.clone()),
    ];
    if !es.painless {
        env.push(("EMBEDJOIN__STATE__LATE_PARTS", "new_item".into()));
    }
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        crate::cli::run_full(&["check"], &env)
    })
    .await
    .unwrap();
    let all = format!("{stdout}\n{stderr}");
    assert_eq!(code, 0, "{all}");
    assert!(!all.contains(password), "the password printed:\n{all}");
    assert!(stderr.contains("a Redis Cluster of 3 masters"), "{stderr}");
    assert!(stderr.contains("serving all 16384 slots, 1024 buckets"), "{stderr}");
    assert!(stdout.contains("cluster_nodes = [\"redis://:***@127.0.0.1:"), "{stdout}");
}

/// A master that loses its data (restarted without persistence, or flushed) is noticed
/// by the epoch marker of its own buckets: one reset, counted and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_lost_its_data_is_noticed() {
    let (cluster, es) = (RedisCluster::start(3, 0).await, EsTarget::start().await);
    let mut settings = cluster_settings(&cluster, &es);
    settings.durability.maintenance_interval = Duration::from_millis(100);
    settings.durability.outbox_resend_after = Duration::from_millis(200);
    let app = spawn_app(settings).await;
    let resets = || async {
        let text = app.http.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
        crate::durability::metric(&text, "embedjoin_state_resets_total")
    };
    assert_eq!(resets().await, 0.0);
    let victim = cluster.masters().await[1];
    let client = redis::Client::open(format!("redis://127.0.0.1:{victim}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while resets().await < 1.0 {
        assert!(std::time::Instant::now() < deadline, "the lost data was never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(resets().await, 1.0, "one master lost its data once");
    app.stop().await.unwrap();
}

/// Slots moved from one master to another while two instances write: calls that meet a
/// slot mid-move (`ASK`, `TRYAGAIN`) or after it (`MOVED`) are sent again where it went,
/// and every item is still indexed exactly once, with its vectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_moved_while_loading_lose_and_duplicate_nothing() {
    let (cluster, es) = (RedisCluster::start(3, 0).await, EsTarget::start().await);
    let a = spawn_app(cluster_settings(&cluster, &es)).await;
    let b = spawn_app(cluster_settings(&cluster, &es)).await;
    let ids: Vec<String> = (0..4_000).map(|i| format!("m-{i}")).collect();
    let masters = cluster.masters().await;
    let started = std::time::Instant::now();
    let (loaded, moved) = tokio::join!(
        async {
            texts_to_one_images_to_the_other(&a, &b, &ids, 11).await;
            started.elapsed()
        },
        async {
            cluster.reshard(masters[0], masters[1], 600).await;
            started.elapsed()
        }
    );
    eprintln!("slots moved: the load took {loaded:?}, moving 600 slots {moved:?}");
    assert!(moved > loaded / 2, "most of the load ran while slots were moving");
    let writes = assert_indexed_exactly(&es, &ids).await;
    assert_eq!(writes, ids.len() as u64, "each item indexed once");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
