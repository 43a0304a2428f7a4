//! A real Redis Cluster per test: one `redis-server` (7.0) per node, each on a free port
//! whose cluster bus port (+10000) is free too, each in its own temporary directory, joined
//! by `redis-cli --cluster create`. Never the shared server on 6379. Nodes can be killed to
//! inject failovers.
//!
//! The binary is `EMBEDJOIN_TEST_REDIS_SERVER` (default `redis-server` on PATH); `redis-cli`
//! is the one next to it, else the one on PATH.
//!
//! Drop kills the nodes. So does the test process's end, however it ends (a cluster leaked
//! into a static, a panic that aborts, a SIGKILL): a watchdog `sh` per cluster waits for EOF
//! on a pipe only this process holds, then kills the nodes and removes their directories.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisCluster {
    nodes: Vec<Node>,
    /// For each port killed with `kill`, the ports that replicated it at that moment: the
    /// candidates for its failover.
    replicas_of_killed: HashMap<u16, Vec<u16>>,
    /// Kills the nodes when this process ends without dropping the cluster.
    watchdog: Option<Child>,
    /// The watchdogs of nodes restarted since.
    restarted_watchdogs: Vec<Child>,
}

struct Node {
    /// `None` once killed.
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    std::env::var_os("EMBEDJOIN_TEST_REDIS_SERVER").map(PathBuf::from).unwrap_or_else(|| "redis-server".into())
}

/// The `redis-cli` next to the server binary, else the one on PATH.
fn cli() -> PathBuf {
    let server = binary();
    match server.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && dir.join("redis-cli").is_file() => dir.join("redis-cli"),
        _ => "redis-cli".into(),
    }
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// `count` distinct ports p < 55535 such that p and p + 10000 (its cluster bus port) both
/// bind on 127.0.0.1. All are held until every one is chosen, so none repeats; they are free
/// again on return, so another process may take one before the node does (`start` retries).
fn free_ports(count: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..10_000 {
        if ports.len() == count {
            return ports;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().unwrap().port();
        held.push(listener);
        if port < 55535 {
            if let Ok(bus) = TcpListener::bind(("127.0.0.1", port + 10000)) {
                held.push(bus);
                ports.push(port);
            }
        }
    }
    panic!("cannot find {count} free ports below 55535 whose port + 10000 is free too");
}

/// The value of `name` in an INFO-style answer (`name:value` lines).
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')).map(str::trim_end)
}

/// One command to one node, on a connection of its own.
async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let mut conn = redis::Client::open(url(port))?.get_multiplexed_async_connection().await?;
    cmd.query_async(&mut conn).await
}

async fn try_info(port: u16, section: &str) -> redis::RedisResult<String> {
    query(port, redis::cmd("INFO").arg(section)).await
}

async fn cluster_info(port: u16) -> redis::RedisResult<String> {
    query(port, redis::cmd("CLUSTER").arg("INFO")).await
}

impl RedisCluster {
    /// Starts `masters` masters (at least 3: `redis-cli --cluster create` refuses fewer) with
    /// `replicas_per_master` replicas each, and returns once every node reports
    /// `cluster_state:ok` and knows every other node, and every replica's link to its master
    /// is up (its first sync done). Every node keeps an append-only file (fsync always), so
    /// what it acknowledged survives its SIGKILL; failure detection is fast
    /// (`cluster-node-timeout` 1000 ms). Takes about 2 s, most of it `redis-cli` waiting
    /// for the nodes to meet.
    pub async fn start(masters: usize, replicas_per_master: usize) -> RedisCluster {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters (redis-cli --cluster create refuses fewer)");
        for _ in 0..5 {
            if let Some(cluster) = Self::try_start(masters, replicas_per_master).await {
                return cluster;
            }
        }
        panic!("the redis-server nodes did not start; is redis-server installed? (./scripts/test installs it)");
    }

    /// `None` when a node exited before answering PING (its port or bus port was taken
    /// since we chose it): start again on other ports. Any other failure panics.
    async fn try_start(masters: usize, replicas_per_master: usize) -> Option<RedisCluster> {
        let count = masters * (1 + replicas_per_master);
        let mut cluster = RedisCluster {
            nodes: Vec::with_capacity(count),
            replicas_of_killed: HashMap::new(),
            watchdog: None,
            restarted_watchdogs: Vec::new(),
        };
        for port in free_ports(count) {
            let dir = tempfile::tempdir().expect("temp dir");
            let child = spawn_node(port, dir.path());
            cluster.nodes.push(Node { child: Some(child), port, dir });
        }
        cluster.watchdog = Some(spawn_watchdog(&cluster.nodes));
        if !cluster.wait_for_ping().await {
            return None;
        }
        cluster.create(replicas_per_master).await;
        cluster.wait_until_ready(masters, replicas_per_master).await;
        Some(cluster)
    }

    /// Whether every node answers PING (within 10 s); false as soon as one has exited.
    async fn wait_for_ping(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in &mut self.nodes {
            loop {
                if let Some(status) = node.child.as_mut().unwrap().try_wait().unwrap() {
                    eprintln!(
                        "redis-server (cluster node) on port {} exited with {status}: {}",
                        node.port,
                        log_tail(node.dir.path(), 3)
                    );
                    node.child = None;
                    return false;
                }
                if query::<String>(node.port, &redis::cmd("PING")).await.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!("redis-server (cluster node) on port {} does not answer PING", node.port);
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        true
    }

    /// `redis-cli --cluster create`: assigns the slots, makes the nodes meet, attaches the
    /// replicas. Its output goes to `cluster-create.log` in the first node's directory.
    async fn create(&self, replicas_per_master: usize) {
        let log_path = self.nodes[0].dir.path().join("cluster-create.log");
        let log = std::fs::File::create(&log_path).expect("create the redis-cli log");
        let mut child = Command::new(cli())
            .args(["--cluster", "create"])
            .args(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas_per_master.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot run redis-cli; is it installed next to redis-server or on PATH?");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-cli --cluster create did not finish within 30 s:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            status.success(),
            "redis-cli --cluster create failed ({status}):\n{}\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            self.log_tails()
        );
    }

    /// Polls until every node reports `cluster_state:ok` and knows all the others, there are
    /// `masters * replicas_per_master` replicas, and each has `master_link_status:up`.
    async fn wait_until_ready(&self, masters: usize, replicas_per_master: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let missing = self.not_ready(masters * replicas_per_master).await;
            let Some(missing) = missing else { return };
            if Instant::now() > deadline {
                panic!("the Redis Cluster was not ready within 30 s: {missing}\n{}", self.log_tails());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What keeps the cluster from being ready, if anything.
    async fn not_ready(&self, replicas: usize) -> Option<String> {
        let known = self.nodes.len().to_string();
        let mut linked = 0;
        for node in &self.nodes {
            let info = match cluster_info(node.port).await {
                Ok(info) => info,
                Err(e) => return Some(format!("port {}: CLUSTER INFO failed: {e}", node.port)),
            };
            if field(&info, "cluster_state") != Some("ok")
                || field(&info, "cluster_known_nodes") != Some(known.as_str())
            {
                return Some(format!(
                    "port {} reports cluster_state:{} cluster_known_nodes:{}",
                    node.port,
                    field(&info, "cluster_state").unwrap_or("?"),
                    field(&info, "cluster_known_nodes").unwrap_or("?")
                ));
            }
            if replicas > 0 {
                let info = match try_info(node.port, "replication").await {
                    Ok(info) => info,
                    Err(e) => return Some(format!("port {}: INFO replication failed: {e}", node.port)),
                };
                if field(&info, "role") == Some("slave") {
                    if field(&info, "master_link_status") != Some("up") {
                        return Some(format!("the replica on port {} is not in sync yet", node.port));
                    }
                    linked += 1;
                }
            }
        }
        (linked != replicas).then(|| format!("{linked} replicas of {replicas} are attached"))
    }

    /// `redis://127.0.0.1:port` of every node, in start order, killed ones included (a seed
    /// list as a deployment would configure it).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| url(n.port)).collect()
    }

    fn live_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.port)
    }

    /// The ports of the live nodes that are masters now (by their own `INFO replication`),
    /// ascending.
    pub async fn masters(&self) -> Vec<u16> {
        let mut masters = Vec::new();
        for port in self.live_ports() {
            if field(&self.info(port, "replication").await, "role") == Some("master") {
                masters.push(port);
            }
        }
        masters.sort_unstable();
        masters
    }

    /// Kills the node at once (SIGKILL): no save, no goodbye. First notes which live nodes
    /// replicate it, for `wait_for_failover`.
    pub fn kill(&mut self, port: u16) {
        let replicas = self.replicas_now(port);
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap_or_else(|| panic!("no node on port {port}"));
        let mut child = node.child.take().unwrap_or_else(|| panic!("the node on port {port} is already dead"));
        let _ = child.kill();
        let _ = child.wait();
        self.replicas_of_killed.insert(port, replicas);
    }

    /// Starts a killed node again on its port and directory, as an operator would after a
    /// failover: it rejoins as a replica of the master that took over its slots. Returns once
    /// its link to that master is up (30 s at most).
    pub async fn restart(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap_or_else(|| panic!("no node on port {port}"));
        assert!(node.child.is_none(), "the node on port {port} is alive");
        node.child = Some(spawn_node(port, node.dir.path()));
        self.restarted_watchdogs.push(spawn_watchdog(std::slice::from_ref(node)));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(info) = try_info(port, "replication").await {
                if field(&info, "role") == Some("slave") && field(&info, "master_link_status") == Some("up") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the restarted node on port {port} did not rejoin as a replica\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The live nodes that replicate `master` now. Blocking (short, local) queries, so that
    /// `kill` stays a plain function.
    fn replicas_now(&self, master: u16) -> Vec<u16> {
        let master = master.to_string();
        self.live_ports()
            .filter(|&port| {
                let info = redis::Client::open(url(port))
                    .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(1)))
                    .and_then(|mut conn| {
                        conn.set_read_timeout(Some(Duration::from_secs(1)))?;
                        redis::cmd("INFO").arg("replication").query::<String>(&mut conn)
                    });
                info.is_ok_and(|info| {
                    field(&info, "role") == Some("slave") && field(&info, "master_port") == Some(master.as_str())
                })
            })
            .collect()
    }

    /// Waits (up to 30 s) until a node that replicated `dead` when it was killed is a master,
    /// every live node reports `cluster_state:ok`, and no live node still gives `dead` any
    /// slot. Panics, saying what is missing, otherwise.
    pub async fn wait_for_failover(&self, dead: u16) {
        let replicas = self
            .replicas_of_killed
            .get(&dead)
            .unwrap_or_else(|| panic!("wait_for_failover({dead}): that node was not killed with kill()"));
        assert!(
            !replicas.is_empty(),
            "wait_for_failover({dead}): it had no live replica when killed; nothing can take over"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let Some(missing) = self.failover_missing(dead, replicas).await else { return };
            if Instant::now() > deadline {
                panic!(
                    "no failover of the master on port {dead} (replicas {replicas:?}) within 30 s: {missing}\n{}",
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the failover of `dead` still lacks, if anything.
    async fn failover_missing(&self, dead: u16, replicas: &[u16]) -> Option<String> {
        let mut promoted = false;
        for &port in replicas.iter().filter(|&&p| self.live_ports().any(|live| live == p)) {
            if let Ok(info) = try_info(port, "replication").await {
                promoted |= field(&info, "role") == Some("master");
            }
        }
        if !promoted {
            return Some(format!("none of its replicas {replicas:?} is a master yet"));
        }
        let dead_address = format!("127.0.0.1:{dead}@");
        for port in self.live_ports() {
            match cluster_info(port).await {
                Ok(info) if field(&info, "cluster_state") == Some("ok") => {}
                Ok(info) => {
                    return Some(format!(
                        "port {port} reports cluster_state:{}",
                        field(&info, "cluster_state").unwrap_or("?")
                    ))
                }
                Err(e) => return Some(format!("port {port}: CLUSTER INFO failed: {e}")),
            }
            let nodes: String = match query(port, redis::cmd("CLUSTER").arg("NODES")).await {
                Ok(nodes) => nodes,
                Err(e) => return Some(format!("port {port}: CLUSTER NODES failed: {e}")),
            };
            // <id> <ip:port@cport> <flags> <master> <ping-sent> <pong-recv> <epoch> <link> <slot>...
            let dead_line =
                nodes.lines().find(|line| line.split(' ').nth(1).is_some_and(|a| a.starts_with(&dead_address)));
            if dead_line.is_some_and(|line| line.split_whitespace().count() > 8) {
                return Some(format!("port {port} still gives slots to port {dead}"));
            }
        }
        None
    }

    /// A cluster connection (redis-rs `cluster-async`) for assertions, seeded with the live
    /// nodes.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        let seeds: Vec<String> = self.live_ports().map(url).collect();
        redis::cluster::ClusterClient::new(seeds.clone())
            .unwrap()
            .get_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the Redis Cluster through {seeds:?}: {e}"))
    }

    /// `INFO section` of one node, on a plain connection.
    pub async fn info(&self, port: u16, section: &str) -> String {
        try_info(port, section).await.unwrap_or_else(|e| panic!("INFO {section} on port {port} failed: {e}"))
    }

    /// Moves `slots` slots from the master at `from` to the master at `to` while the cluster
    /// serves (`redis-cli --cluster reshard`: each slot's keys migrate one by one, the
    /// clients meeting `ASK` and `TRYAGAIN` meanwhile). Returns when the move is done.
    pub async fn reshard(&self, from: u16, to: u16, slots: usize) {
        let id = |port: u16| async move {
            query::<String>(port, redis::cmd("CLUSTER").arg("MYID")).await.expect("CLUSTER MYID")
        };
        let (from_id, to_id) = (id(from).await, id(to).await);
        let cli = cli();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(cli)
                .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
                .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
                .args(["--cluster-slots", &slots.to_string(), "--cluster-yes", "--cluster-pipeline", "100"])
                .stdin(Stdio::null())
                .output()
                .expect("cannot run redis-cli")
        })
        .await
        .unwrap();
        assert!(
            output.status.success(),
            "redis-cli --cluster reshard failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The last lines of every node's log, for failure messages.
    fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let state = if n.child.is_some() { "" } else { " (killed)" };
                format!("--- node {}{state}:\n{}", n.port, log_tail(n.dir.path(), 8))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn spawn_node(port: u16, dir: &Path) -> Child {
    Command::new(binary())
        .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000"])
        // `always`: what a node acknowledged must survive its SIGKILL.
        .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
        // A replica's first sync starts at once, not after the default 5 s wait for more
        // replicas to share a diskless transfer.
        .args(["--repl-diskless-sync-delay", "0"])
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--logfile", "redis.log"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot run redis-server; is it installed? (./scripts/test installs it)")
}

/// On EOF on its stdin (this process gone, our end of the pipe closed by the kernel), kills
/// every node that still runs under its pid (the pid not reused: its command line still
/// names its port) and removes the node directories. Ignores the terminal's signals, which
/// end this process first.
const WATCHDOG: &str = r#"
trap '' INT TERM HUP QUIT
read -r _ || :
i=0
for arg in "$@"; do
  case $((i % 3)) in
    0) pid=$arg ;;
    1) case "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" in *"$arg"*) kill -9 "$pid" 2>/dev/null ;; esac ;;
  esac
  i=$((i + 1))
done
sleep 0.2
i=0
for arg in "$@"; do
  if [ $((i % 3)) -eq 2 ]; then rm -rf "$arg"; fi
  i=$((i + 1))
done
"#;

fn spawn_watchdog(nodes: &[Node]) -> Child {
    let mut watchdog = Command::new("sh");
    watchdog.args(["-c", WATCHDOG, "redis-cluster-watchdog"]);
    for node in nodes {
        if let Some(child) = &node.child {
            watchdog.arg(child.id().to_string()).arg(node.port.to_string()).arg(node.dir.path());
        }
    }
    // Our end of the pipe is close-on-exec: no other child inherits it.
    watchdog.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("cannot run sh")
}

fn log_tail(dir: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for mut watchdog in self.watchdog.take().into_iter().chain(self.restarted_watchdogs.drain(..)) {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}
