//! The real `embedjoin` binary as a child process, configured by environment variables,
//! so tests can SIGKILL it (a crash) or SIGTERM it (a shutdown).

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::es::EsTarget;

pub struct ServiceProcess {
    child: Option<Child>,
    pub address: String,
}

impl ServiceProcess {
    /// Starts the binary with `EMBEDJOIN__...` variables and waits until `/health` answers.
    pub async fn start(env: &[(String, String)]) -> ServiceProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(env!("CARGO_BIN_EXE_embedjoin"))
            .arg("serve")
            .env_remove("EMBEDJOIN_CONFIG")
            .env("EMBEDJOIN__HTTP__BIND", format!("127.0.0.1:{port}"))
            .env("EMBEDJOIN__LOG__LEVEL", "warn")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let process = ServiceProcess { child: Some(child), address: format!("http://127.0.0.1:{port}") };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{}/health", process.address)).send().await {
                if r.status().is_success() {
                    return process;
                }
            }
            assert!(Instant::now() < deadline, "the service did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// A crash: SIGKILL, no shutdown at all.
    pub fn kill(&mut self) {
        self.signal("KILL");
        let _ = self.child.take().unwrap().wait();
    }

    /// A shutdown: SIGTERM, then wait for the exit.
    pub async fn terminate(mut self, within: Duration) -> ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the service did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The environment for a child service using this Redis and Elasticsearch index.
pub fn service_env(redis_url: &str, es: &EsTarget, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let (es_url, index) = (&es.url, &es.index);
    let mut env = vec![
        // The defaults are embedded + file; these services use Redis and Elasticsearch.
        ("EMBEDJOIN__STATE__BACKEND".to_owned(), "redis".to_owned()),
        ("EMBEDJOIN__SINK__BACKEND".to_owned(), "elasticsearch".to_owned()),
        ("EMBEDJOIN__REDIS__URL".to_owned(), redis_url.to_owned()),
        ("EMBEDJOIN__ELASTICSEARCH__URL".to_owned(), es_url.to_owned()),
        ("EMBEDJOIN__ELASTICSEARCH__INDEX".to_owned(), index.to_owned()),
        ("EMBEDJOIN__HTTP__WORKERS".to_owned(), "1".to_owned()),
        ("EMBEDJOIN__SHARDS__COUNT".to_owned(), "2".to_owned()),
        ("EMBEDJOIN__ELASTICSEARCH__RETRY_INITIAL_BACKOFF".to_owned(), "10ms".to_owned()),
        ("EMBEDJOIN__ELASTICSEARCH__RETRY_MAX_BACKOFF".to_owned(), "200ms".to_owned()),
    ];
    if !es.painless {
        // As in `test_settings`: a cluster without painless takes no guarded updates.
        env.push(("EMBEDJOIN__STATE__LATE_PARTS".to_owned(), "new_item".to_owned()));
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}
