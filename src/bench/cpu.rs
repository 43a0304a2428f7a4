//! CPU cost of a run, per embedding: this process's (getrusage: user + system time) and
//! Redis's (`INFO cpu`, `used_cpu_user` + `used_cpu_sys`; `INFO commandstats` for the
//! commands it ran; `INFO stats`, `total_net_input_bytes` + `total_net_output_bytes`, for
//! the bytes it exchanged with every client), read before and after. On a shared machine
//! CPU time per embedding is steadier than wall time, and it is what scales.
//!
//! Against a Redis Cluster every master is read: Redis's figures are the sums over the
//! masters, and each master's share of the commands and its own CPU per embedding show
//! how evenly the buckets spread the work.

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use serde::Serialize;

use super::redis_nodes;
use crate::config::{Settings, StateBackend};

/// CPU seconds used by this process so far (user + system).
pub fn process_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU seconds used so far by another process of this machine (user + system, from
/// `/proc/PID/stat`, in clock ticks): the server driven over `--http`.
pub fn pid_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    stat_seconds(&stat, if ticks > 0 { ticks as f64 } else { 100.0 })
}

/// utime + stime of a `/proc/PID/stat` line, in seconds. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted from its closing parenthesis.
fn stat_seconds(stat: &str, ticks_per_second: f64) -> Option<f64> {
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// What one Redis node reported at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeReading {
    pub cpu_seconds: f64,
    /// Commands run so far (scripts' inner commands included; the bench's own INFO and
    /// CLUSTER calls left out).
    pub commands: u64,
    /// Bytes in and out over every client connection (the bench's INFO calls included).
    pub net_bytes: u64,
    /// `used_memory`: what Redis's allocator holds.
    pub used_memory: u64,
}

impl NodeReading {
    fn plus(self, other: &NodeReading) -> NodeReading {
        NodeReading {
            cpu_seconds: self.cpu_seconds + other.cpu_seconds,
            commands: self.commands + other.commands,
            net_bytes: self.net_bytes + other.net_bytes,
            used_memory: self.used_memory + other.used_memory,
        }
    }
}

/// What Redis reported at one moment: the sums over its nodes, and each master's own in
/// cluster mode.
#[derive(Debug, Clone, Default)]
pub struct RedisReading {
    pub total: NodeReading,
    /// Per master (`host:port`), in the order of the first slot each serves; empty for a
    /// single node.
    pub masters: Vec<(String, NodeReading)>,
}

/// Reads Redis's CPU and command totals, when the run uses Redis: those of the node, or of
/// every master of the cluster (each on a connection of its own, read concurrently).
pub async fn redis_reading(settings: &Settings) -> Option<RedisReading> {
    if settings.state.backend != StateBackend::Redis {
        return None;
    }
    let nodes = match redis_nodes::connect(&settings.redis).await {
        Ok(nodes) => nodes,
        Err(e) => {
            eprintln!("note: cannot read Redis's INFO: {e:#}");
            return None;
        }
    };
    let readings = join_all(
        nodes.into_iter().map(|mut node| async move { Some((node.address, node_reading(&mut node.conn).await?)) }),
    )
    .await;
    // A node that did not answer would make the totals look cheaper: no reading at all.
    let readings: Vec<(String, NodeReading)> = readings.into_iter().collect::<Option<_>>()?;
    let total = readings.iter().fold(NodeReading::default(), |sum, (_, r)| sum.plus(r));
    let masters = if redis_nodes::is_cluster(&settings.redis) { readings } else { Vec::new() };
    Some(RedisReading { total, masters })
}

async fn node_reading(conn: &mut MultiplexedConnection) -> Option<NodeReading> {
    let cpu: String = redis::cmd("INFO").arg("cpu").query_async(conn).await.ok()?;
    let commands: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.ok()?;
    let stats: String = redis::cmd("INFO").arg("stats").query_async(conn).await.ok()?;
    let memory: String = redis::cmd("INFO").arg("memory").query_async(conn).await.ok()?;
    let mut reading = parse(&cpu, &commands, &stats);
    reading.used_memory = memory.lines().find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok()).unwrap_or(0);
    Some(reading)
}

/// How many completed items this run's key prefix remembers in Redis: the fields of its
/// record hashes (`{prefix}{<tag>}r:<k>`, see `state::records`), on every node.
pub async fn records(settings: &Settings) -> Option<u64> {
    let pattern = format!("{}{{*}}r:*", redis_nodes::glob_escape(&settings.redis.key_prefix));
    let mut total = 0;
    for mut node in redis_nodes::connect(&settings.redis).await.ok()? {
        let mut keys = redis_nodes::scan(&mut node.conn, &pattern).await.ok()?;
        // SCAN may list a key twice.
        keys.sort_unstable();
        keys.dedup();
        for chunk in keys.chunks(1000) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("HLEN").arg(key);
            }
            let lengths: Vec<u64> = pipe.query_async(&mut node.conn).await.ok()?;
            total += lengths.iter().sum::<u64>();
        }
    }
    Some(total)
}

fn parse(cpu: &str, commandstats: &str, stats: &str) -> NodeReading {
    let field = |text: &str, name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    // cmdstat_hset:calls=12,usec=34,...; subcommands as cmdstat_cluster|slots:calls=...
    let commands = commandstats
        .lines()
        // The bench's own INFO calls, and its CLUSTER SLOTS to find the masters, are not the run's work.
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:") && !l.starts_with("cmdstat_cluster"))
        .filter_map(|l| l.split_once("calls=")?.1.split(',').next()?.parse::<u64>().ok())
        .sum();
    NodeReading {
        cpu_seconds: field(cpu, "used_cpu_user:") + field(cpu, "used_cpu_sys:"),
        commands,
        net_bytes: (field(stats, "total_net_input_bytes:") + field(stats, "total_net_output_bytes:")) as u64,
        used_memory: 0,
    }
}

/// One master's part of a cluster run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MasterCost {
    /// `host:port`.
    pub address: String,
    /// Its share of the commands the masters ran over the run, in percent.
    pub command_share_percent: f64,
    /// Its CPU over the run, per embedding of the whole run.
    pub redis_us_per_embedding: f64,
}

/// CPU per embedding over a run.
#[derive(Debug, Clone, Serialize)]
pub struct CpuCost {
    /// This process (in-process mode: the whole pipeline, and the senders); over `--http`,
    /// the server's process when `--pid` names it.
    pub service_us_per_embedding: Option<f64>,
    /// Redis, when the run used it.
    pub redis_us_per_embedding: Option<f64>,
    /// Commands Redis ran per embedding (scripts' inner commands included).
    pub redis_commands_per_embedding: Option<f64>,
    /// Bytes Redis received and sent per embedding.
    pub redis_bytes_per_embedding: Option<f64>,
    /// Completed items the run left remembered in Redis, and Redis's memory growth over
    /// the run per such record (in-process runs: the run's keys are its records by then).
    pub redis_records: Option<u64>,
    pub redis_bytes_per_record: Option<f64>,
    /// In cluster mode, each master's share of the commands and its CPU per embedding
    /// (their sum is `redis_us_per_embedding`).
    pub redis_masters: Option<Vec<MasterCost>>,
}

impl CpuCost {
    /// Adds the records a run left and Redis's memory growth per record.
    pub fn with_records(
        mut self,
        records: Option<u64>,
        redis: (Option<&RedisReading>, Option<&RedisReading>),
    ) -> CpuCost {
        if let (Some(n), (Some(a), Some(b))) = (records.filter(|&n| n > 0), redis) {
            self.redis_records = Some(n);
            self.redis_bytes_per_record =
                Some(b.total.used_memory.saturating_sub(a.total.used_memory) as f64 / n as f64);
        }
        self
    }

    pub fn between(
        service: Option<(f64, f64)>,
        redis: (Option<&RedisReading>, Option<&RedisReading>),
        embeddings: u64,
    ) -> CpuCost {
        let n = embeddings.max(1) as f64;
        let us = |a: &NodeReading, b: &NodeReading| (b.cpu_seconds - a.cpu_seconds).max(0.0) * 1e6 / n;
        let (mut redis_us, mut commands, mut bytes, mut masters) = (None, None, None, None);
        if let (Some(a), Some(b)) = redis {
            redis_us = Some(us(&a.total, &b.total));
            commands = Some(b.total.commands.saturating_sub(a.total.commands) as f64 / n);
            bytes = Some(b.total.net_bytes.saturating_sub(a.total.net_bytes) as f64 / n);
            // A master seen only after the run started (a failover) has no share.
            let both: Vec<(&String, &NodeReading, &NodeReading)> = b
                .masters
                .iter()
                .filter_map(|(address, after)| {
                    let (_, before) = a.masters.iter().find(|(m, _)| m == address)?;
                    Some((address, before, after))
                })
                .collect();
            let all: u64 = both.iter().map(|(_, a, b)| b.commands.saturating_sub(a.commands)).sum();
            masters = (!both.is_empty()).then(|| {
                both.iter()
                    .map(|(address, a, b)| MasterCost {
                        address: (*address).clone(),
                        command_share_percent: b.commands.saturating_sub(a.commands) as f64 * 100.0 / all.max(1) as f64,
                        redis_us_per_embedding: us(a, b),
                    })
                    .collect()
            });
        }
        CpuCost {
            service_us_per_embedding: service.map(|(before, after)| (after - before).max(0.0) * 1e6 / n),
            redis_us_per_embedding: redis_us,
            redis_commands_per_embedding: commands,
            redis_bytes_per_embedding: bytes,
            redis_records: None,
            redis_bytes_per_record: None,
            redis_masters: masters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_readings_and_per_embedding_costs() {
        let cpu = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:9\r\n";
        let stats = "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=500,usec_per_call=50.00\r\ncmdstat_hset:calls=30,usec=60\r\ncmdstat_info:calls=7,usec=9\r\ncmdstat_cluster|slots:calls=3,usec=9\r\n";
        let net =
            "# Stats\r\ntotal_net_input_bytes:1000\r\ntotal_net_output_bytes:500\r\ntotal_net_repl_input_bytes:7\r\n";
        let before = RedisReading { total: parse(cpu, stats, net), masters: Vec::new() };
        assert_eq!((before.total.cpu_seconds, before.total.commands, before.total.net_bytes), (3.75, 40, 1500));
        let after = RedisReading {
            total: NodeReading { cpu_seconds: 4.75, commands: 240, net_bytes: 201_501_500, used_memory: 0 },
            masters: Vec::new(),
        };
        let cost = CpuCost::between(Some((1.0, 1.5)), (Some(&before), Some(&after)), 100_000);
        assert!((cost.service_us_per_embedding.unwrap() - 5.0).abs() < 1e-9);
        assert!((cost.redis_bytes_per_embedding.unwrap() - 2015.0).abs() < 1e-9);
        assert!((cost.redis_us_per_embedding.unwrap() - 10.0).abs() < 1e-9);
        assert!((cost.redis_commands_per_embedding.unwrap() - 0.002).abs() < 1e-12);
        assert_eq!(cost.redis_masters, None, "a single node has no per-master figures");
        assert!(process_seconds() > 0.0, "this process has used some CPU");
        let stat = "4242 (embed join) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 77 0 0";
        assert_eq!(stat_seconds(stat, 100.0), Some(3.0));
        assert_eq!(stat_seconds("garbage", 100.0), None);
        assert!(pid_seconds(std::process::id()).is_some());
        // Over --http without --pid: Redis only.
        assert_eq!(CpuCost::between(None, (Some(&before), Some(&after)), 1).service_us_per_embedding, None);
    }

    #[test]
    fn each_master_gets_its_share_of_the_commands_and_its_cpu() {
        let node = |cpu_seconds, commands| NodeReading { cpu_seconds, commands, net_bytes: 0, used_memory: 0 };
        let reading = |nodes: &[(&str, NodeReading)]| RedisReading {
            total: nodes.iter().fold(NodeReading::default(), |sum, (_, r)| sum.plus(r)),
            masters: nodes.iter().map(|(a, r)| (a.to_string(), *r)).collect(),
        };
        let before = reading(&[("a:1", node(1.0, 100)), ("b:2", node(2.0, 200)), ("c:3", node(0.5, 0))]);
        // c:3 is gone after the run (failed over to d:4, which was not read before).
        let after = reading(&[("a:1", node(1.3, 400)), ("b:2", node(2.1, 300)), ("d:4", node(0.0, 50))]);
        let cost = CpuCost::between(None, (Some(&before), Some(&after)), 1000);
        let masters = cost.redis_masters.unwrap();
        let figures: Vec<(&str, f64, f64)> =
            masters.iter().map(|m| (m.address.as_str(), m.command_share_percent, m.redis_us_per_embedding)).collect();
        assert_eq!(figures.len(), 2, "{figures:?}");
        assert_eq!(figures[0].0, "a:1");
        assert!((figures[0].1 - 75.0).abs() < 1e-9 && (figures[0].2 - 300.0).abs() < 1e-6, "{figures:?}");
        assert!((figures[1].1 - 25.0).abs() < 1e-9 && (figures[1].2 - 100.0).abs() < 1e-6, "{figures:?}");
    }
}
