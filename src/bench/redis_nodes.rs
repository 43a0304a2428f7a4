//! The Redis nodes a run's keys live on, each on a plain connection of its own: the node of
//! `redis.url`, or, with `redis.cluster_nodes`, every master of the cluster (read from
//! `CLUSTER SLOTS` on the first seed that answers). The bench reads each one's INFO, counts
//! the records it holds and removes the run's keys from it: INFO and SCAN answer for one
//! node only, and a cluster refuses an UNLINK of keys in several slots.
//!
//! These connections skip `CLIENT SETINFO` when they connect, so that reading a node adds
//! no command to the counts it reads (its own INFO and CLUSTER calls are left out by name,
//! see [`super::cpu`]).

use std::collections::HashMap;

use anyhow::Context;
use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::cluster_routing::Slot;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};

use crate::config::RedisSettings;

/// One node, and a connection to it.
pub struct Node {
    /// `host:port`, as `CLUSTER SLOTS` names it (or as the URL does, for a single node).
    pub address: String,
    pub conn: MultiplexedConnection,
}

/// Whether the settings name a cluster (then every node is a master, and keys of several
/// slots cannot share a command).
pub fn is_cluster(settings: &RedisSettings) -> bool {
    !settings.cluster_nodes.is_empty()
}

/// Connects to the node of `redis.url`, or to every master of the cluster, in the order of
/// the first slot each serves.
pub async fn connect(settings: &RedisSettings) -> anyhow::Result<Vec<Node>> {
    if !is_cluster(settings) {
        return Ok(vec![open(plain(&settings.url)?).await?]);
    }
    let mut failures = Vec::new();
    for seed in &settings.cluster_nodes {
        match masters(seed).await {
            Ok(masters) => return join_all(masters.into_iter().map(open)).await.into_iter().collect(),
            Err(e) => failures.push(format!("{}: {e:#}", address(&plain(seed)?))),
        }
    }
    anyhow::bail!("no seed of redis.cluster_nodes named the cluster's masters ({})", failures.join("; "))
}

/// The masters of the cluster `seed` belongs to, with the seed's credentials and TLS.
async fn masters(seed: &str) -> anyhow::Result<Vec<ConnectionInfo>> {
    let info = plain(seed)?;
    let mut conn = open(info.clone()).await?.conn;
    let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await?;
    let masters = parse_masters(&reply).with_context(|| format!("unexpected CLUSTER SLOTS reply: {reply:?}"))?;
    anyhow::ensure!(!masters.is_empty(), "the cluster serves no slot yet");
    let seed_host = match info.addr() {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    Ok(masters
        .into_iter()
        .map(|(host, port)| {
            // A node that does not know its own address names it "" or "?": the seed's host.
            let host = if host.is_empty() || host == "?" { seed_host.clone() } else { host };
            let addr = match info.addr() {
                ConnectionAddr::TcpTls { insecure, tls_params, .. } => {
                    ConnectionAddr::TcpTls { host, port, insecure: *insecure, tls_params: tls_params.clone() }
                }
                _ => ConnectionAddr::Tcp(host, port),
            };
            info.clone().set_addr(addr)
        })
        .collect())
}

/// `(host, port)` of each master in a `CLUSTER SLOTS` reply, once each, in the order of
/// the lowest slot it serves; `None` if the reply is not shaped like one.
fn parse_masters(reply: &Value) -> Option<Vec<(String, u16)>> {
    let Value::Array(ranges) = reply else { return None };
    let mut starts: Vec<(i64, String, u16)> = Vec::new();
    for range in ranges {
        let Value::Array(fields) = range else { return None };
        let (Some(Value::Int(start)), Some(Value::Array(master))) = (fields.first(), fields.get(2)) else {
            return None;
        };
        let host = match master.first()? {
            Value::BulkString(h) => String::from_utf8_lossy(h).into_owned(),
            Value::SimpleString(h) => h.clone(),
            _ => return None,
        };
        let Some(Value::Int(port)) = master.get(1) else { return None };
        starts.push((*start, host, u16::try_from(*port).ok()?));
    }
    starts.sort();
    let mut masters: Vec<(String, u16)> = Vec::new();
    for (_, host, port) in starts {
        if !masters.iter().any(|(h, p)| *h == host && *p == port) {
            masters.push((host, port));
        }
    }
    Some(masters)
}

/// The URL's connection settings, without `CLIENT SETINFO`.
fn plain(url: &str) -> anyhow::Result<ConnectionInfo> {
    let info = url.into_connection_info().context("not a Redis URL")?;
    let redis = info.redis_settings().clone().set_skip_set_lib_name();
    Ok(info.set_redis_settings(redis))
}

async fn open(info: ConnectionInfo) -> anyhow::Result<Node> {
    let address = address(&info);
    let conn = redis::Client::open(info)?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("cannot connect to {address}"))?;
    Ok(Node { address, conn })
}

fn address(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        ConnectionAddr::Unix(path) => path.display().to_string(),
        other => format!("{other:?}"),
    }
}

/// Every key of one node that matches `pattern` (SCAN; a key may be listed twice).
pub async fn scan(conn: &mut MultiplexedConnection, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut found = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query_async(conn).await?;
        found.extend(keys);
        if next == 0 {
            return Ok(found);
        }
        cursor = next;
    }
}

/// `text` matched literally by a SCAN pattern.
pub fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `keys` split into groups a single command may take: one group on a single node, one
/// per slot in a cluster.
pub fn by_slot<'a>(keys: impl IntoIterator<Item = &'a str>, cluster: bool) -> Vec<Vec<&'a str>> {
    if !cluster {
        let all: Vec<&str> = keys.into_iter().collect();
        return if all.is_empty() { Vec::new() } else { vec![all] };
    }
    let mut groups: HashMap<Slot, Vec<&str>> = HashMap::new();
    for key in keys {
        groups.entry(Slot::for_key(key)).or_default().push(key);
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn masters_come_from_cluster_slots_once_each_in_slot_order() {
        let node = |host: &str, port: i64| Value::Array(vec![bulk(host), Value::Int(port), bulk("id")]);
        let range = |start: i64, end: i64, master: Value, replica: Option<Value>| {
            let mut fields = vec![Value::Int(start), Value::Int(end), master];
            fields.extend(replica);
            Value::Array(fields)
        };
        let reply = Value::Array(vec![
            range(10923, 16383, node("127.0.0.1", 7003), None),
            range(0, 5460, node("127.0.0.1", 7001), Some(node("127.0.0.1", 7101))),
            range(5461, 10921, node("", 7002), None),
            range(10922, 10922, node("127.0.0.1", 7001), None),
        ]);
        assert_eq!(
            parse_masters(&reply).unwrap(),
            [("127.0.0.1".into(), 7001), (String::new(), 7002), ("127.0.0.1".into(), 7003)]
        );
        assert_eq!(parse_masters(&Value::Array(vec![])).unwrap(), []);
        assert_eq!(parse_masters(&bulk("ERR")), None);
    }

    #[test]
    fn deletes_are_grouped_per_slot_in_a_cluster_only() {
        let keys = ["p:{1}i:a", "p:{1}r:0", "p:{2}i:b", "p:deadletter"];
        let groups = by_slot(keys, true);
        assert_eq!(groups.len(), 3, "{groups:?}");
        for group in &groups {
            assert!(group.iter().all(|k| Slot::for_key(k) == Slot::for_key(group[0])), "{group:?}");
        }
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 4);
        assert_eq!(by_slot(keys, false), [keys.to_vec()]);
        assert!(by_slot([], false).is_empty());
    }

    #[test]
    fn prefixes_are_matched_literally() {
        assert_eq!(glob_escape("embedjoin-bench-0f:"), "embedjoin-bench-0f:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
