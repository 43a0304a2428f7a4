//! A real `redis-server` per test, on a free port, in its own temporary directory.
//! Never the shared one on 6379. It can be killed and restarted to inject faults.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    appendonly: bool,
}

fn binary() -> PathBuf {
    std::env::var_os("EMBEDJOIN_TEST_REDIS_SERVER").map(PathBuf::from).unwrap_or_else(|| "redis-server".into())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    /// Starts a server that keeps nothing on disk.
    pub async fn start() -> RedisServer {
        Self::start_with(false).await
    }

    /// Starts a server with the append-only file on (fsync every second), so a restart
    /// keeps what was written.
    pub async fn start_with(appendonly: bool) -> RedisServer {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut server = RedisServer { child: None, port: free_port(), dir, appendonly };
            if server.spawn().await {
                return server;
            }
        }
        panic!("redis-server did not start; is it installed? (./scripts/test installs it)");
    }

    async fn spawn(&mut self) -> bool {
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", if self.appendonly { "yes" } else { "no" }])
            // `always`: what a test acknowledges in persisted mode must survive a SIGKILL.
            .args(["--appendfsync", "always", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run redis-server; is it installed? (./scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("redis-server on port {} exited with {status}", self.port);
                self.child = None;
                return false;
            }
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok() {
                        return true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL): no save, no goodbye.
    pub fn kill(&mut self) {
        self.stop_child();
    }

    /// Starts the server again on the same port and directory.
    pub async fn restart(&mut self) {
        self.stop_child();
        assert!(self.spawn().await, "redis-server did not restart on port {}", self.port);
    }

    fn stop_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The dead letters stored under the default prefix, oldest first, as JSON.
    pub async fn dead_letters(&self) -> Vec<serde_json::Value> {
        let mut conn = self.connection().await;
        let raw: Vec<String> =
            redis::cmd("LRANGE").arg("embedjoin:deadletter").arg(0).arg(-1).query_async(&mut conn).await.unwrap();
        raw.iter().map(|l| serde_json::from_str(l).expect("a dead letter is JSON")).collect()
    }

    /// Waits until at least one dead letter is stored (or 30 s pass); returns them all.
    pub async fn wait_for_dead_letters(&self) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let letters = self.dead_letters().await;
            if !letters.is_empty() || std::time::Instant::now() > deadline {
                return letters;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A plain connection for assertions.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }
}

/// Where the default settings keep an item's keys (the tests' services use them).
pub fn keys() -> embedjoin::state::redis::keys::Keys {
    let redis = embedjoin::Settings::defaults().redis;
    embedjoin::state::redis::keys::Keys::new(&redis.key_prefix, redis.buckets, redis.record_buckets)
}

/// The key of `id`'s item hash, under the default settings.
pub fn item_key(id: &str) -> String {
    let keys = keys();
    keys.item(keys.bucket(id), id)
}

/// The name of a key without the default prefix and its bucket's hash tag: `i:x` (item x),
/// `o:x` (its outbox entry), `outbox`, `partials`, `epoch`, `r:3` (records), `deadletter`.
pub fn key_role(key: &str) -> &str {
    let rest = key.strip_prefix("embedjoin:").unwrap_or(key);
    match rest.strip_prefix('{').and_then(|r| r.find('}').map(|end| &r[end + 1..])) {
        Some(role) => role,
        None => rest,
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop_child();
    }
}
