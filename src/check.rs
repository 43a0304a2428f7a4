//! `embedjoin check`: tells an operator, before serving, whether this configuration can run
//! here.
//!
//! - The settings are valid (loading them validates them; a bad one never gets here).
//! - The effective settings are printed, on stdout, as TOML or JSON, secrets shown as `***`
//!   (their `Serialize` redacts them, see [`crate::secret`]).
//! - Each backend is reached within `--timeout`: the state store as `serve` opens it (for
//!   Redis: connection, credentials, version, script loading), and the sink (Elasticsearch
//!   or OpenSearch: `GET /`, whose engine and version are printed; files: the directory can
//!   be written).
//!
//! The verdict goes to stderr, one line per check; a failure says what to fix and the exit
//! status is 1. Nothing secret is printed, even inside a backend's own error message.
//! Opening the state store does what `serve` does at start and nothing more (Redis: loads
//! the scripts and writes the epoch marker; embedded: creates the store file if missing).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::config::{LatePartsAction, Settings, SinkBackend, StateBackend};
use crate::model::Schema;
use crate::secret::{redact_url, REDACTED};
use crate::sink::elasticsearch::EsSink;
use crate::sink::SinkError;
use crate::state::{StateError, StateStore};

/// The oldest Redis embedjoin runs on (the outbox and orphan sweeps use ZRANGE ... BYSCORE).
const MIN_REDIS: (u32, u32) = (6, 2);

/// `embedjoin check`'s options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// How to print the effective settings.
    #[arg(long, value_enum, default_value_t = Format::Toml)]
    pub format: Format,
    /// How long each backend gets to answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Output format of the effective settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Toml,
    Json,
}

/// Runs the check, prints the settings and the verdict; exit status 0 when every backend
/// answered, 1 otherwise.
pub async fn run(settings: &Settings, args: &CheckArgs) -> ExitCode {
    match render_settings(settings, args.format) {
        Ok(text) => println!("{text}"),
        Err(e) => {
            eprintln!("embedjoin check: cannot print the settings: {e}");
            return ExitCode::FAILURE;
        }
    }
    let results = [
        ("state store", check_state(settings, args.timeout).await),
        ("sink", check_sink(settings, args.timeout).await),
    ];
    let secrets = secrets_of(settings);
    let mut failed = 0;
    for (what, result) in &results {
        match result {
            Ok(fine) => eprintln!("ok    {what}: {}", scrub(fine, &secrets)),
            Err(problem) => {
                failed += 1;
                eprintln!("FAIL  {what}: {}", scrub(problem, &secrets));
            }
        }
    }
    if failed == 0 {
        eprintln!("embedjoin check: the settings are valid and every backend answers.");
        ExitCode::SUCCESS
    } else {
        eprintln!("embedjoin check: {failed} of {} checks failed.", results.len());
        ExitCode::FAILURE
    }
}

/// The effective settings as TOML or pretty JSON, secrets redacted.
pub fn render_settings(settings: &Settings, format: Format) -> Result<String, String> {
    match format {
        Format::Toml => toml::to_string(settings)
            .map(|t| format!("# embedjoin's effective settings (secrets shown as {REDACTED})\n{t}"))
            .map_err(|e| e.to_string()),
        Format::Json => serde_json::to_string_pretty(settings).map_err(|e| e.to_string()),
    }
}

/// Opens the state store as `serve` does, and pings it.
async fn check_state(settings: &Settings, timeout: Duration) -> Result<String, String> {
    let mut described = String::from("answers");
    if settings.state.backend == StateBackend::Redis {
        described = diagnose_redis(settings, timeout).await?;
    }
    let schema = Schema::new(&settings.parts);
    let opened = tokio::time::timeout(timeout, async {
        let store = StateStore::connect(settings, &schema).await?;
        store.ping().await?;
        Ok::<_, StateError>(store)
    })
    .await;
    if let Ok(Ok(StateStore::Redis(store))) = &opened {
        let wanted = settings.redis.wait_replicas;
        let replicas = store.nodes().replicas().await.map_err(|e| state_problem(settings, &e))?;
        if let Some((master, n)) = replicas.iter().find(|(_, n)| *n < wanted) {
            return Err(format!(
                "redis.wait_replicas is {wanted} but the master {master} has {n} replicas: none of \
                 its flushes could be confirmed (they would fail, and requests answer 503). Add \
                 replicas or lower redis.wait_replicas."
            ));
        }
    }
    match opened {
        Ok(Ok(StateStore::Redis(store))) if store.nodes().is_cluster() => {
            let topology = store.nodes().topology();
            let uncovered = topology.uncovered();
            let masters = topology.masters.join(", ");
            if uncovered > 0 {
                return Err(format!(
                    "the Redis Cluster serves {} of 16384 slots: items of buckets in the other {uncovered} \
                     cannot be stored. Masters: {masters}. Fix the cluster (redis-cli --cluster check).",
                    16384 - uncovered
                ));
            }
            Ok(format!(
                "{described}; a Redis Cluster of {} masters ({masters}) serving all 16384 slots, \
                 {} buckets",
                topology.masters.len(),
                store.keys().buckets()
            ))
        }
        Ok(Ok(_)) => Ok(described),
        Ok(Err(e)) => Err(state_problem(settings, &e)),
        Err(_) => Err(format!("the {:?} state store did not open within {timeout:?}.", settings.state.backend)),
    }
}

fn state_problem(settings: &Settings, e: &StateError) -> String {
    match e {
        StateError::Redis(e) => redis_problem(settings, redis_target(settings), e),
        StateError::EmbeddedOpen { .. } => format!(
            "{e}. Is a running embedjoin holding it (one process per store file)? Set embedded.path or \
             EMBEDJOIN__EMBEDDED__PATH."
        ),
        other => format!("the {:?} state store failed: {other}.", settings.state.backend),
    }
}

/// Reaches Redis with a plain connection first, to say precisely what is wrong: nobody
/// listening, no answer, refused credentials, too old a version.
async fn diagnose_redis(settings: &Settings, timeout: Duration) -> Result<String, String> {
    let url = redis_target(settings);
    let shown = redact_url(url);
    let no_answer = || {
        format!(
            "Redis at {shown} did not answer within {timeout:?}. Is the host reachable, and is it \
             a Redis (rediss:// for TLS)? Set {}.",
            redis_setting(settings)
        )
    };
    let client = redis::Client::open(url).map_err(|e| redis_problem(settings, url, &e))?;
    let config =
        redis::AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
    let info: String = tokio::time::timeout(timeout, async {
        let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        // INFO may be denied to a restricted ACL user; the version is then not checked.
        Ok::<_, redis::RedisError>(redis::cmd("INFO").arg("server").query_async(&mut conn).await.unwrap_or_default())
    })
    .await
    .map_err(|_| no_answer())?
    .map_err(|e| if e.is_timeout() { no_answer() } else { redis_problem(settings, url, &e) })?;
    let version = info.lines().find_map(|l| l.strip_prefix("redis_version:")).map(str::trim);
    match version.and_then(parse_version) {
        Some(v) if v < MIN_REDIS => Err(format!(
            "Redis at {shown} is version {}; embedjoin needs {}.{} or newer.",
            version.unwrap_or_default(),
            MIN_REDIS.0,
            MIN_REDIS.1
        )),
        _ => Ok(format!(
            "Redis {} at {shown} answers and takes embedjoin's scripts",
            version.unwrap_or("(version not shown)")
        )),
    }
}

/// The Redis embedjoin reaches first: the first seed of a cluster, or the single node.
fn redis_target(settings: &Settings) -> &str {
    settings.redis.cluster_nodes.first().unwrap_or(&settings.redis.url)
}

/// The setting that says where Redis is.
fn redis_setting(settings: &Settings) -> &'static str {
    if settings.redis.cluster_nodes.is_empty() {
        "redis.url or EMBEDJOIN__REDIS__URL"
    } else {
        "redis.cluster_nodes or EMBEDJOIN__REDIS__CLUSTER_NODES"
    }
}

/// What went wrong with Redis, and what to fix.
fn redis_problem(settings: &Settings, url: &str, e: &redis::RedisError) -> String {
    let shown = redact_url(url);
    let fix = format!("Set {}.", redis_setting(settings));
    if e.is_connection_refusal() {
        return format!("cannot reach Redis at {shown}: Connection refused. Is redis-server running? {fix}");
    }
    let code = e.code().unwrap_or_default();
    if e.kind() == redis::ErrorKind::AuthenticationFailed || matches!(code, "WRONGPASS" | "NOAUTH") {
        return format!(
            "Redis at {shown} refused the credentials ({e}). Put the user and password in the URL \
             (redis://user:password@host:port). {fix}"
        );
    }
    if code == "NOPERM" {
        return format!(
            "the Redis user of {shown} lacks a permission embedjoin needs ({e}): it runs scripts \
             (EVALSHA, SCRIPT LOAD) and reads and writes keys under redis.key_prefix."
        );
    }
    if e.is_io_error() {
        return format!("cannot reach Redis at {shown}: {e}. Check the host and port. {fix}");
    }
    format!("Redis at {shown} failed: {e}.")
}

/// `major.minor` of a version string like `7.2.4`.
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Builds the sink client as `serve` does, and pings it (for files: writes and removes a
/// probe file, rather than start an empty output file).
async fn check_sink(settings: &Settings, timeout: Duration) -> Result<String, String> {
    let reached = check_sink_answers(settings, timeout).await?;
    if settings.sink.backend != SinkBackend::Elasticsearch || settings.state.late_parts != LatePartsAction::Update {
        return Ok(reached);
    }
    let es = EsSink::new(&settings.elasticsearch).map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, es.runs_painless()).await {
        Ok(Ok(true)) => Ok(format!("{reached}; it runs painless scripts (state.late_parts = \"update\")")),
        Ok(Ok(false)) => Err(crate::sink::NO_PAINLESS.into()),
        Ok(Err(e)) => Ok(format!("{reached}; cannot tell whether it runs painless scripts ({e})")),
        Err(_) => Ok(format!("{reached}; cannot tell whether it runs painless scripts (no answer)")),
    }
}

async fn check_sink_answers(settings: &Settings, timeout: Duration) -> Result<String, String> {
    match settings.sink.backend {
        SinkBackend::Null => return Ok("null (documents are discarded; for benchmarks only)".into()),
        SinkBackend::File => return check_file_sink(&settings.file.dir),
        SinkBackend::Elasticsearch => {}
    }
    let shown = redact_url(&settings.elasticsearch.url);
    let es = EsSink::new(&settings.elasticsearch).map_err(|e| format!("{e}. Check the [elasticsearch] settings."))?;
    match tokio::time::timeout(timeout, es.engine()).await {
        // A configured engine is not asked for; the cluster must still answer.
        Ok(Ok(engine)) if engine.version.is_empty() => match tokio::time::timeout(timeout, es.ping()).await {
            Ok(Ok(())) => Ok(format!("{engine} (as configured) at {shown} answers")),
            Ok(Err(e)) => Err(format!("{engine} at {shown} answered with an error: {e}.")),
            Err(_) => Err(format!("{engine} at {shown} did not answer within {timeout:?}.")),
        },
        Ok(Ok(engine)) => {
            let index = &settings.elasticsearch.index;
            let schema = crate::model::Schema::new(&settings.parts);
            match tokio::time::timeout(
                timeout,
                es.verify_mapping(engine.kind, &schema, settings.elasticsearch.similarity),
            )
            .await
            {
                Ok(Ok(())) => {
                    Ok(format!("{engine} at {shown} answers; index {index} agrees with the configured parts"))
                }
                Ok(Err(SinkError::Status { status: 404, .. })) => {
                    Ok(format!("{engine} at {shown} answers; index {index} does not exist yet (created at start)"))
                }
                Ok(Err(e)) => Err(format!("{engine} at {shown}: {e}.")),
                Err(_) => Err(format!("{engine} at {shown} did not answer within {timeout:?}.")),
            }
        }
        Ok(Err(SinkError::Status { status: status @ (401 | 403), error_type, reason })) => Err(format!(
            "Elasticsearch at {shown} refused the credentials ({status} {error_type}: {reason}). Set \
             elasticsearch.username and elasticsearch.password, or elasticsearch.api_key \
             (EMBEDJOIN__ELASTICSEARCH__PASSWORD, EMBEDJOIN__ELASTICSEARCH__API_KEY)."
        )),
        Ok(Err(SinkError::Transport(e))) => Err(format!(
            "cannot reach Elasticsearch at {shown}: {e}. Is it running? Set elasticsearch.url or \
             EMBEDJOIN__ELASTICSEARCH__URL (or sink.backend = \"null\" to discard documents)."
        )),
        Ok(Err(e)) => Err(format!("Elasticsearch at {shown} answered with an error: {e}.")),
        Err(_) => Err(format!(
            "Elasticsearch at {shown} did not answer within {timeout:?}. Is the host reachable? \
             Set elasticsearch.url or EMBEDJOIN__ELASTICSEARCH__URL."
        )),
    }
}

fn check_file_sink(dir: &std::path::Path) -> Result<String, String> {
    let probe = dir.join(format!(".embedjoin-check-{}", std::process::id()));
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b""))
        .and_then(|()| std::fs::remove_file(&probe))
        .map(|()| format!("files in {} (writable)", dir.display()))
        .map_err(|e| format!("cannot write files in {}: {e}. Set file.dir or EMBEDJOIN__FILE__DIR.", dir.display()))
}

/// Every secret the settings hold, as it could appear in a backend's error message.
fn secrets_of(settings: &Settings) -> Vec<String> {
    let mut secrets = vec![
        settings.http.auth_token.expose().to_owned(),
        settings.elasticsearch.password.expose().to_owned(),
        settings.elasticsearch.api_key.expose().to_owned(),
    ];
    let urls = [&settings.redis.url, &settings.elasticsearch.url].into_iter().chain(&settings.redis.cluster_nodes);
    for url in urls {
        if let Some(password) = url::Url::parse(url).ok().and_then(|u| u.password().map(str::to_owned)) {
            secrets.push(password);
        }
    }
    secrets.retain(|s| !s.is_empty());
    secrets
}

/// `text` with every secret replaced by `***`.
fn scrub(text: &str, secrets: &[String]) -> String {
    secrets.iter().fold(text.to_owned(), |t, s| t.replace(s.as_str(), REDACTED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_settings_hide_every_secret() {
        let mut s = Settings::defaults();
        s.redis.url = "redis://app:redis-pw@cache:6390/1".into();
        s.http.auth_token = "tok-123".into();
        s.elasticsearch.username = "elastic".into();
        s.elasticsearch.password = "es-pw".into();
        for format in [Format::Toml, Format::Json] {
            let text = render_settings(&s, format).unwrap();
            for secret in ["redis-pw", "tok-123", "es-pw"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(text.contains("redis://app:***@cache:6390/1"), "{text}");
            assert!(text.contains("elastic"), "{text}");
        }
        let toml = render_settings(&s, Format::Toml).unwrap();
        assert!(toml.contains("[[parts]]") && toml.contains("flush_interval = \"50ms\""), "{toml}");
    }

    #[test]
    fn scrub_removes_secrets_from_backend_messages() {
        let secrets = vec!["pw".to_owned()];
        assert_eq!(scrub("error for url (http://u:pw@es/)", &secrets), "error for url (http://u:***@es/)");
    }

    #[test]
    fn versions_compare_by_major_and_minor() {
        assert_eq!(parse_version("6.0.16"), Some((6, 0)));
        assert!(parse_version("6.0.16").unwrap() < MIN_REDIS);
        assert!(parse_version("7.2.4").unwrap() >= MIN_REDIS);
        assert_eq!(parse_version("x"), None);
    }
}
