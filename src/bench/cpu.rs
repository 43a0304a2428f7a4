//! CPU cost of a run, per embedding: this process's (getrusage: user + system time) and
//! Redis's (`INFO cpu`, `used_cpu_user` + `used_cpu_sys`; `INFO commandstats` for the
//! commands it ran; `INFO stats`, `total_net_input_bytes` + `total_net_output_bytes`, for
//! the bytes it exchanged with every client), read before and after. On a shared machine CPU time per embedding is
//! steadier than wall time, and it is what scales.

use serde::Serialize;

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

/// What Redis reported at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisReading {
    pub cpu_seconds: f64,
    pub commands: u64,
    /// Bytes in and out over every client connection (the bench's INFO calls included).
    pub net_bytes: u64,
    /// `used_memory`: what Redis's allocator holds.
    pub used_memory: u64,
}

/// Reads Redis's CPU and command totals, when the run uses Redis.
pub async fn redis_reading(settings: &Settings) -> Option<RedisReading> {
    if settings.state.backend != StateBackend::Redis {
        return None;
    }
    let client = redis::Client::open(settings.redis.url.as_str()).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let cpu: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await.ok()?;
    let commands: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.ok()?;
    let stats: String = redis::cmd("INFO").arg("stats").query_async(&mut conn).await.ok()?;
    let memory: String = redis::cmd("INFO").arg("memory").query_async(&mut conn).await.ok()?;
    let mut reading = parse(&cpu, &commands, &stats);
    reading.used_memory = memory.lines().find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok()).unwrap_or(0);
    Some(reading)
}

/// How many completed items this run's key prefix remembers in Redis (the fields of its
/// record hashes, `state::records`).
pub async fn records(settings: &Settings) -> Option<u64> {
    let client = redis::Client::open(settings.redis.url.as_str()).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let pattern = format!("{}records:*", settings.redis.key_prefix);
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut conn).await.ok()?;
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("HLEN").arg(key);
    }
    let lengths: Vec<u64> = if keys.is_empty() { Vec::new() } else { pipe.query_async(&mut conn).await.ok()? };
    Some(lengths.iter().sum())
}

fn parse(cpu: &str, commandstats: &str, stats: &str) -> RedisReading {
    let field = |text: &str, name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    // cmdstat_hset:calls=12,usec=34,...
    let commands = commandstats
        .lines()
        // The bench's own INFO calls are not the run's work.
        .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
        .filter_map(|l| l.split_once("calls=")?.1.split(',').next()?.parse::<u64>().ok())
        .sum();
    RedisReading {
        cpu_seconds: field(cpu, "used_cpu_user:") + field(cpu, "used_cpu_sys:"),
        commands,
        net_bytes: (field(stats, "total_net_input_bytes:") + field(stats, "total_net_output_bytes:")) as u64,
        used_memory: 0,
    }
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
}

impl CpuCost {
    /// Adds the records a run left and Redis's memory growth per record.
    pub fn with_records(
        mut self,
        records: Option<u64>,
        redis: (Option<RedisReading>, Option<RedisReading>),
    ) -> CpuCost {
        if let (Some(n), (Some(a), Some(b))) = (records.filter(|&n| n > 0), redis) {
            self.redis_records = Some(n);
            self.redis_bytes_per_record = Some(b.used_memory.saturating_sub(a.used_memory) as f64 / n as f64);
        }
        self
    }

    pub fn between(
        service: Option<(f64, f64)>,
        redis: (Option<RedisReading>, Option<RedisReading>),
        embeddings: u64,
    ) -> CpuCost {
        let n = embeddings.max(1) as f64;
        let (redis_us, commands, bytes) = match redis {
            (Some(a), Some(b)) => (
                Some((b.cpu_seconds - a.cpu_seconds).max(0.0) * 1e6 / n),
                Some(b.commands.saturating_sub(a.commands) as f64 / n),
                Some(b.net_bytes.saturating_sub(a.net_bytes) as f64 / n),
            ),
            _ => (None, None, None),
        };
        CpuCost {
            service_us_per_embedding: service.map(|(before, after)| (after - before).max(0.0) * 1e6 / n),
            redis_us_per_embedding: redis_us,
            redis_commands_per_embedding: commands,
            redis_bytes_per_embedding: bytes,
            redis_records: None,
            redis_bytes_per_record: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_readings_and_per_embedding_costs() {
        let cpu = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:9\r\n";
        let stats = "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=500,usec_per_call=50.00\r\ncmdstat_hset:calls=30,usec=60\r\ncmdstat_info:calls=7,usec=9\r\n";
        let net =
            "# Stats\r\ntotal_net_input_bytes:1000\r\ntotal_net_output_bytes:500\r\ntotal_net_repl_input_bytes:7\r\n";
        let before = parse(cpu, stats, net);
        assert_eq!((before.cpu_seconds, before.commands, before.net_bytes), (3.75, 40, 1500));
        let after = RedisReading { cpu_seconds: 4.75, commands: 240, net_bytes: 201_501_500, used_memory: 0 };
        let cost = CpuCost::between(Some((1.0, 1.5)), (Some(before), Some(after)), 100_000);
        assert!((cost.service_us_per_embedding.unwrap() - 5.0).abs() < 1e-9);
        assert!((cost.redis_bytes_per_embedding.unwrap() - 2015.0).abs() < 1e-9);
        assert!((cost.redis_us_per_embedding.unwrap() - 10.0).abs() < 1e-9);
        assert!((cost.redis_commands_per_embedding.unwrap() - 0.002).abs() < 1e-12);
        assert!(process_seconds() > 0.0, "this process has used some CPU");
        let stat = "4242 (embed join) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 77 0 0";
        assert_eq!(stat_seconds(stat, 100.0), Some(3.0));
        assert_eq!(stat_seconds("garbage", 100.0), None);
        assert!(pid_seconds(std::process::id()).is_some());
        // Over --http without --pid: Redis only.
        assert_eq!(CpuCost::between(None, (Some(before), Some(after)), 1).service_us_per_embedding, None);
    }
}
