//! The connection to Redis: one node (or a primary with replicas) through `redis.url`, or a
//! Redis Cluster through `redis.cluster_nodes`, behind one way of running many calls.
//!
//! [`Nodes::exec`] runs a list of calls, each on one slot (see [`super::keys`]): it groups
//! them by the master that serves their slot, sends each group as one pipeline on a
//! connection of its own to that master, the groups concurrently, and returns the replies
//! in order. Every call may be sent twice (all of
//! embedjoin's calls are idempotent), so:
//!
//! - a reply that says the slot moved (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`: a failover
//!   or a resharding) sends that call again by itself, which the cluster client redirects
//!   (and so learns the new owner), and refreshes the grouping;
//! - a reply that says the node does not know a script (`NOSCRIPT`: a restarted node, or a
//!   replica promoted since the scripts were loaded) loads the scripts there and sends the
//!   call again.
//!
//! With `redis.wait_replicas = N`, a durable write's group ends with `WAIT N`: the writes
//! count as done only once N replicas of that master have them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::AsyncConnectionConfig;
use redis::{Cmd, ErrorKind, RedisFuture, ServerErrorKind, Value};

use super::keys::SLOTS;
use crate::config::RedisSettings;
use crate::state::StateError;

/// How often one call is sent again after a redirection or a missing script.
const ATTEMPTS: usize = 4;

/// One call: a command whose keys are all in `slot`.
pub struct Call {
    pub slot: u16,
    pub cmd: Cmd,
}

/// A connection of either kind; cheap to clone.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Which master serves each slot, as last read (`CLUSTER SLOTS`).
#[derive(Debug, Clone)]
pub struct Topology {
    /// `host:port` of each master.
    pub masters: Vec<String>,
    /// Per slot, the index of its master in `masters`, or `None` while no master serves it.
    pub owner: Vec<Option<u16>>,
    /// Per master, its replicas (as the slot map lists them; `None` for a single node,
    /// whose replicas [`Nodes::replicas`] asks for).
    pub replicas: Vec<Option<usize>>,
}

impl Topology {
    fn single(url: &str) -> Topology {
        Topology {
            masters: vec![crate::secret::redact_url(url)],
            owner: vec![Some(0); SLOTS as usize],
            replicas: vec![None],
        }
    }

    /// Slots no master serves.
    pub fn uncovered(&self) -> usize {
        self.owner.iter().filter(|o| o.is_none()).count()
    }

    fn parse(reply: Value) -> Result<Topology, StateError> {
        let bad = || StateError::Protocol(format!("unexpected CLUSTER SLOTS reply: {reply:?}"));
        let Value::Array(ranges) = &reply else { return Err(bad()) };
        let mut topology = Topology { masters: Vec::new(), owner: vec![None; SLOTS as usize], replicas: Vec::new() };
        for range in ranges {
            let Value::Array(fields) = range else { return Err(bad()) };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return Err(bad());
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => return Err(bad()),
            };
            let Some(Value::Int(port)) = master.get(1) else { return Err(bad()) };
            let address = format!("{host}:{port}");
            let index = match topology.masters.iter().position(|m| *m == address) {
                Some(i) => i,
                None => {
                    topology.masters.push(address);
                    topology.replicas.push(Some(fields.len().saturating_sub(3)));
                    topology.masters.len() - 1
                }
            };
            for slot in (*start).max(0)..=(*end).min(i64::from(SLOTS) - 1) {
                topology.owner[slot as usize] = Some(index as u16);
            }
        }
        Ok(topology)
    }
}

/// The connection, what it knows of the cluster, and the scripts every master must have.
#[derive(Clone)]
pub struct Nodes {
    conn: Conn,
    topology: Arc<RwLock<Arc<Topology>>>,
    scripts: Arc<Vec<String>>,
    /// `(replicas, timeout)` for durable writes, from `redis.wait_replicas`.
    wait: Option<(usize, Duration)>,
    /// On a cluster, a connection of our own to each master, by `host:port`, for the
    /// flushes' pipelines: its replies come back one per call (the cluster client turns a
    /// pipeline with one redirected call into an error for all, though the others ran).
    masters: Arc<tokio::sync::Mutex<HashMap<String, MultiplexedConnection>>>,
    /// A seed's URL (scheme, credentials, TLS), for the connections to the masters.
    seed: String,
    timeouts: (Duration, Duration),
}

impl Nodes {
    /// Connects to the configured node or cluster and loads `scripts` on every master.
    pub async fn connect(settings: &RedisSettings, scripts: Vec<String>) -> Result<Nodes, StateError> {
        let conn = if settings.cluster_nodes.is_empty() {
            let client = redis::Client::open(settings.url.as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(settings.response_timeout))
                .set_connection_timeout(Some(settings.connection_timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            Conn::Single(ConnectionManager::new_with_config(client, config).await?)
        } else {
            let client = redis::cluster::ClusterClient::builder(settings.cluster_nodes.iter().map(String::as_str))
                .response_timeout(settings.response_timeout)
                .connection_timeout(settings.connection_timeout)
                .retries(3)
                .max_retry_wait(1000)
                .build()?;
            Conn::Cluster(client.get_async_connection().await?)
        };
        let wait = (settings.wait_replicas > 0).then_some((settings.wait_replicas, settings.wait_timeout));
        let nodes = Nodes {
            conn,
            topology: Arc::new(RwLock::new(Arc::new(Topology::single(&settings.url)))),
            scripts: Arc::new(scripts),
            wait,
            masters: Arc::default(),
            seed: settings.cluster_nodes.first().unwrap_or(&settings.url).clone(),
            timeouts: (settings.connection_timeout, settings.response_timeout),
        };
        nodes.refresh().await?;
        nodes.load_scripts(None).await?;
        Ok(nodes)
    }

    /// A connection for commands on one key (or keys of one slot): the cluster client
    /// routes them itself.
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// The masters and which slots each serves, as last read.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The replicas of each master: `(master, replicas)`.
    pub async fn replicas(&self) -> Result<Vec<(String, usize)>, StateError> {
        let topology = self.topology();
        let mut out = Vec::new();
        for (master, replicas) in topology.masters.iter().zip(&topology.replicas) {
            let n = match replicas {
                Some(n) => *n,
                None => {
                    let info: String = redis::cmd("INFO").arg("replication").query_async(&mut self.conn()).await?;
                    info.lines()
                        .find_map(|l| l.strip_prefix("connected_slaves:"))
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0)
                }
            };
            out.push((master.clone(), n));
        }
        Ok(out)
    }

    /// Reads the cluster's slot map again (nothing to read for a single node).
    pub async fn refresh(&self) -> Result<Arc<Topology>, StateError> {
        let Conn::Cluster(_) = &self.conn else { return Ok(self.topology()) };
        let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut self.conn()).await?;
        let topology = Arc::new(Topology::parse(reply)?);
        *self.topology.write().unwrap_or_else(|e| e.into_inner()) = topology.clone();
        Ok(topology)
    }

    /// Loads the scripts on the master of `slot`, or on every master.
    async fn load_scripts(&self, slot: Option<u16>) -> Result<(), StateError> {
        let routing = match slot {
            Some(slot) => {
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master)))
            }
            None => RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, Some(ResponsePolicy::AllSucceeded))),
        };
        for script in self.scripts.iter() {
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(script.as_str());
            match &self.conn {
                Conn::Single(c) => {
                    load.query_async::<()>(&mut c.clone()).await?;
                }
                Conn::Cluster(c) => {
                    c.clone().route_command(load, routing.clone()).await?;
                }
            }
        }
        Ok(())
    }

    /// Runs `calls` (see the module's doc); `durable` writes wait for the configured
    /// replicas. One reply per call, in order; a server error is that call's reply.
    pub async fn exec(&self, calls: &[Call], durable: bool) -> Result<Vec<Value>, StateError> {
        self.exec_each(calls, durable).await.into_iter().collect()
    }

    /// As [`Nodes::exec`], but a master that fails (down, mid-failover, replicas that do
    /// not confirm) fails only the calls sent to it: the others have their replies.
    pub async fn exec_each(&self, calls: &[Call], durable: bool) -> Vec<Result<Value, StateError>> {
        let topology = self.topology();
        let mut groups: Vec<(u16, usize, Vec<usize>)> = Vec::new();
        let mut group_of_master: Vec<Option<usize>> = vec![None; topology.masters.len() + 1];
        for (i, call) in calls.iter().enumerate() {
            // Slots no master serves (mid-failover) form a group of their own, routed by the
            // client's slot map.
            let master = topology.owner[call.slot as usize].map_or(topology.masters.len(), usize::from);
            match group_of_master[master] {
                Some(g) => groups[g].2.push(i),
                None => {
                    group_of_master[master] = Some(groups.len());
                    groups.push((call.slot, master, vec![i]));
                }
            }
        }
        let sent = join_all(groups.iter().map(|(slot, master, members)| {
            let address = topology.masters.get(*master).map(String::as_str);
            self.pipeline(*slot, address, members, calls, durable)
        }))
        .await;
        let mut replies: Vec<Result<Value, StateError>> = (0..calls.len()).map(|_| Ok(Value::Nil)).collect();
        let mut again = Vec::new();
        let mut refresh = false;
        for ((_, master, members), result) in groups.iter().zip(sent) {
            match result {
                Ok(values) => {
                    for (&i, reply) in members.iter().zip(values) {
                        if retry_alone(&reply).is_some() {
                            again.push(i);
                        }
                        replies[i] = Ok(reply);
                    }
                }
                Err(e) => {
                    refresh = true; // a master down: perhaps a failover is under way
                    let node = topology.masters.get(*master).map_or("slots without a master", String::as_str);
                    let error = e.to_string();
                    for &i in members {
                        replies[i] = Err(StateError::Node { node: node.to_owned(), error: error.clone() });
                    }
                }
            }
        }
        if refresh && again.is_empty() && self.is_cluster() {
            if let Err(e) = self.refresh().await {
                tracing::debug!(error = %e, "Could not read the cluster's slot map again.");
            }
        }
        if !again.is_empty() {
            let (refreshed, alone) =
                tokio::join!(self.refresh(), join_all(again.iter().map(|&i| self.alone(&calls[i], durable))));
            if let Err(e) = refreshed {
                tracing::debug!(error = %e, "Could not read the cluster's slot map again.");
            }
            for (i, reply) in again.into_iter().zip(alone) {
                replies[i] = reply;
            }
        }
        replies
    }

    /// One group's pipeline, sent to the master of `slot`.
    async fn pipeline(
        &self,
        slot: u16,
        master: Option<&str>,
        members: &[usize],
        calls: &[Call],
        durable: bool,
    ) -> Result<Vec<Value>, StateError> {
        let mut pipe = redis::pipe();
        for &i in members {
            pipe.add_command(calls[i].cmd.clone());
        }
        if durable {
            if let Some((replicas, timeout)) = self.wait {
                pipe.cmd("WAIT").arg(replicas).arg(timeout.as_millis() as u64);
            }
        }
        let mut replies = match (&self.conn, master) {
            (Conn::Single(c), _) => c.clone().req_packed_commands(&pipe, 0, pipe.len()).await?,
            (Conn::Cluster(_), Some(master)) => {
                let mut conn = self.master(master).await?;
                match conn.req_packed_commands(&pipe, 0, pipe.len()).await {
                    Ok(replies) => replies,
                    Err(e) => {
                        // Connect again next time (the master may be gone: a failover).
                        self.masters.lock().await.remove(master);
                        return Err(e.into());
                    }
                }
            }
            (Conn::Cluster(c), None) => {
                let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                c.clone().route_pipeline(pipe.clone(), 0, pipe.len(), route).await?
            }
        };
        if durable {
            if let Some((replicas, timeout)) = self.wait {
                let acked = replies.pop();
                check_replicas(acked, replicas, timeout)?;
            }
        }
        if replies.len() != members.len() {
            return Err(StateError::Protocol(format!("{} replies for {} commands", replies.len(), members.len())));
        }
        Ok(replies)
    }

    /// Our connection to the master at `address` (`host:port`), made on first use.
    async fn master(&self, address: &str) -> Result<MultiplexedConnection, StateError> {
        if let Some(conn) = self.masters.lock().await.get(address) {
            return Ok(conn.clone());
        }
        // Connected without the lock held: a master that does not answer (mid-failover)
        // must not hold up the flushes to the others.
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| StateError::Protocol(format!("a master's address `{address}` is not host:port")))?;
        let mut url = url::Url::parse(&self.seed).map_err(|e| StateError::Protocol(format!("seed URL: {e}")))?;
        url.set_host(Some(host)).map_err(|e| StateError::Protocol(format!("master host `{host}`: {e}")))?;
        url.set_port(Some(port)).map_err(|()| StateError::Protocol(format!("master port {port}")))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeouts.0))
            .set_response_timeout(Some(self.timeouts.1));
        let conn = redis::Client::open(url.as_str())?.get_multiplexed_async_connection_with_config(&config).await?;
        Ok(self.masters.lock().await.entry(address.to_owned()).or_insert(conn).clone())
    }

    /// One call sent by itself, routed (and redirected) by the client, until it is neither
    /// redirected nor missing its script.
    async fn alone(&self, call: &Call, durable: bool) -> Result<Value, StateError> {
        let mut reply = Value::Nil;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            reply = match self.conn().req_packed_command(&call.cmd).await {
                Ok(reply) => reply,
                Err(e) if is_noscript(&e) && attempt + 1 < ATTEMPTS => {
                    self.load_scripts(Some(call.slot)).await?;
                    continue;
                }
                Err(e) if (e.is_cluster_error() || e.is_io_error()) && attempt + 1 < ATTEMPTS => continue,
                Err(e) => return Err(e.into()),
            };
            match retry_alone(&reply) {
                Some(Again::Script) => self.load_scripts(Some(call.slot)).await?,
                Some(Again::Moved) => {}
                None => {
                    if durable {
                        self.wait_at(call.slot).await?;
                    }
                    return Ok(reply);
                }
            }
        }
        Ok(reply)
    }

    /// `WAIT` on the master of `slot`, after a write sent there by itself.
    async fn wait_at(&self, slot: u16) -> Result<(), StateError> {
        let Some((replicas, timeout)) = self.wait else { return Ok(()) };
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout.as_millis() as u64);
        let acked = match &self.conn {
            Conn::Single(c) => wait.query_async::<Value>(&mut c.clone()).await?,
            Conn::Cluster(c) => {
                let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                c.clone().route_command(wait, RoutingInfo::SingleNode(route)).await?
            }
        };
        check_replicas(Some(acked), replicas, timeout)
    }
}

fn check_replicas(acked: Option<Value>, wanted: usize, timeout: Duration) -> Result<(), StateError> {
    match acked {
        Some(Value::Int(n)) if n >= wanted as i64 => Ok(()),
        Some(Value::Int(n)) => Err(StateError::Replicas { wanted, acked: n.max(0) as usize, timeout }),
        other => Err(StateError::Protocol(format!("WAIT returned {other:?}"))),
    }
}

enum Again {
    Script,
    Moved,
}

/// Whether a call's reply asks for it to be sent again by itself.
fn retry_alone(reply: &Value) -> Option<Again> {
    let Value::ServerError(e) = reply else { return None };
    match e.kind() {
        Some(ServerErrorKind::NoScript) => Some(Again::Script),
        Some(
            ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown,
        ) => Some(Again::Moved),
        _ => None,
    }
}

/// Whether a reply is a script the node does not know.
pub fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}
