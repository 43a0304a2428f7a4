//! The binary's command line: a bad configuration is refused with a message that names the
//! key, and `check` says which backend cannot be reached and what to set, printing no secret.

use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_embedjoin"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("EMBEDJOIN_CONFIG")
        .output()
        .expect("the binary runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn a_bad_config_file_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[shards]\nmailbox_capacity = 0\n").unwrap();
    let (code, stderr) = run(&["--config", file.to_str().unwrap(), "serve"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("shards.mailbox_capacity"), "{stderr}");
}

#[test]
fn environment_variables_override_the_file_and_are_validated() {
    let (code, stderr) = run(&["serve"], &[("EMBEDJOIN__REDIS__URL", "http://nope")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("redis.url"), "{stderr}");
}

#[test]
fn a_missing_config_file_is_an_error() {
    let (code, stderr) = run(&["--config", "/nonexistent/embedjoin.toml"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("embedjoin.toml"), "{stderr}");
}

/// Runs the binary; returns its exit code, stdout and stderr.
pub(crate) fn run_full(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_embedjoin"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("EMBEDJOIN_CONFIG")
        .output()
        .expect("the binary runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

#[test]
fn check_names_an_unreachable_redis_and_what_to_set() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://127.0.0.1:{port}");
    let env = [
        ("EMBEDJOIN__STATE__BACKEND", "redis"),
        ("EMBEDJOIN__REDIS__URL", url.as_str()),
        ("EMBEDJOIN__SINK__BACKEND", "null"),
    ];
    let (code, stdout, stderr) = run_full(&["check", "--timeout", "5s"], &env);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let expected = format!("cannot reach Redis at {url}: Connection refused. Is redis-server running?");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("Set redis.url or EMBEDJOIN__REDIS__URL."), "{stderr}");
    // The effective settings are printed all the same, to see what was tried.
    assert!(stdout.contains(&format!("url = \"{url}\"")), "{stdout}");
}

#[tokio::test]
async fn check_passes_against_real_backends_without_printing_secrets() {
    use super::support::es::EsTarget;
    use super::support::redis_server::RedisServer;

    let redis = RedisServer::start().await;
    let es = EsTarget::start().await;
    let password = "redis-s3cret-pw";
    let mut conn = redis.connection().await;
    let () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg(password).query_async(&mut conn).await.unwrap();
    let url = format!("redis://:{password}@127.0.0.1:{}", redis.port);
    let mut env: Vec<(&str, String)> = vec![
        ("EMBEDJOIN__STATE__BACKEND", "redis".into()),
        ("EMBEDJOIN__SINK__BACKEND", "elasticsearch".into()),
        ("EMBEDJOIN__REDIS__URL", url),
        ("EMBEDJOIN__ELASTICSEARCH__URL", es.url.clone()),
        ("EMBEDJOIN__ELASTICSEARCH__USERNAME", "elastic".into()),
        ("EMBEDJOIN__ELASTICSEARCH__PASSWORD", "es-s3cret-pw".into()),
        ("EMBEDJOIN__HTTP__AUTH_TOKEN", "token-s3cret".into()),
    ];
    if !es.painless {
        env.push(("EMBEDJOIN__STATE__LATE_PARTS", "new_item".into()));
    }
    for format in ["toml", "json"] {
        let env = env.clone();
        // Off the runtime's thread: the Elasticsearch stand-in answers on it.
        let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run_full(&["check", "--format", format], &env)
        })
        .await
        .unwrap();
        let all = format!("{stdout}\n{stderr}");
        assert_eq!(code, 0, "{all}");
        for secret in [password, "es-s3cret-pw", "token-s3cret"] {
            assert!(!all.contains(secret), "{secret} printed:\n{all}");
        }
        assert!(all.contains(&format!("redis://:***@127.0.0.1:{}", redis.port)), "{all}");
        assert!(stderr.contains("every backend answers"), "{stderr}");
        // The engine and its version, as the cluster's GET / tells them.
        let (engine, major, _) = es.engine().await.expect("GET / names the engine and its version");
        assert!(stderr.contains(&format!("ok    sink: {engine} {major}.")), "{stderr}");
    }
}

#[tokio::test]
async fn check_says_when_redis_refuses_the_credentials() {
    use super::support::redis_server::RedisServer;

    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    let () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg("right-pw").query_async(&mut conn).await.unwrap();
    let url = format!("redis://:wrong-pw@127.0.0.1:{}", redis.port);
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let env = [
            ("EMBEDJOIN__STATE__BACKEND", "redis"),
            ("EMBEDJOIN__REDIS__URL", url.as_str()),
            ("EMBEDJOIN__SINK__BACKEND", "null"),
        ];
        run_full(&["check"], &env)
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(!format!("{stdout}{stderr}").contains("wrong-pw"), "{stdout}\n{stderr}");
}

#[tokio::test]
async fn check_says_when_redis_has_fewer_replicas_than_wait_replicas() {
    use super::support::redis_server::RedisServer;

    let redis = RedisServer::start().await;
    let url = redis.url();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let env = [
            ("EMBEDJOIN__STATE__BACKEND", "redis"),
            ("EMBEDJOIN__REDIS__URL", url.as_str()),
            ("EMBEDJOIN__REDIS__WAIT_REPLICAS", "1"),
            ("EMBEDJOIN__SINK__BACKEND", "null"),
        ];
        run_full(&["check"], &env)
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stderr.contains("redis.wait_replicas is 1 but the master"), "{stderr}");
    assert!(stderr.contains("has 0 replicas"), "{stderr}");
}

#[test]
fn check_passes_with_the_serverless_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let (store, files) = (dir.path().join("state/embedjoin.redb"), dir.path().join("out"));
    let env = [
        ("EMBEDJOIN__STATE__BACKEND", "embedded"),
        ("EMBEDJOIN__EMBEDDED__PATH", store.to_str().unwrap()),
        ("EMBEDJOIN__SINK__BACKEND", "file"),
        ("EMBEDJOIN__FILE__DIR", files.to_str().unwrap()),
    ];
    let (code, stdout, stderr) = run_full(&["check", "--format", "json"], &env);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let printed: serde_json::Value = serde_json::from_str(&stdout).expect("the settings as JSON");
    assert_eq!(printed["state"]["backend"], "embedded");
    // The probe file is gone: check leaves no output file behind.
    assert_eq!(std::fs::read_dir(&files).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_on_a_cluster_without_painless_are_refused_at_check_and_at_start() {
    use super::support::app::test_settings;
    use super::support::es::EsTarget;
    use super::support::redis_server::RedisServer;

    let (redis, es) = (RedisServer::start().await, EsTarget::start().await);
    let Some(standin) = es.standin() else { return }; // the refusal is the stand-in's fault
    standin.set_painless(false);
    let env: Vec<(&str, String)> = vec![
        ("EMBEDJOIN__STATE__BACKEND", "redis".into()),
        ("EMBEDJOIN__SINK__BACKEND", "elasticsearch".into()),
        ("EMBEDJOIN__REDIS__URL", redis.url()),
        ("EMBEDJOIN__ELASTICSEARCH__URL", es.url.clone()),
    ];
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_full(&["check"], &env)
    })
    .await
    .unwrap();
    let all = format!("{stdout}\n{stderr}");
    assert_ne!(code, 0, "{all}");
    assert!(all.contains("refuses painless scripts") && all.contains("state.late_parts = \"new_item\""), "{all}");
    // The service does not start either, with the same words; `new_item` starts.
    let mut settings = test_settings(&redis, &es);
    settings.state.late_parts = embedjoin::config::LatePartsAction::Update;
    let error = format!("{:#}", embedjoin::Application::build(settings.clone()).await.err().expect("start refused"));
    assert!(error.contains("refuses painless scripts"), "{error}");
    settings.state.late_parts = embedjoin::config::LatePartsAction::NewItem;
    assert!(embedjoin::Application::build(settings).await.is_ok());
}
