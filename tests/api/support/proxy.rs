//! A TCP proxy between the service and a real server (Redis) that can lose a reply: the
//! request reaches the server and is applied, but its answer never reaches the client,
//! whose connection is cut instead. This is what a timeout, or a connection lost after the
//! request was sent, looks like to the client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Default)]
struct Shared {
    /// While set, the next request containing these bytes has its reply lost.
    armed: Mutex<Option<Vec<u8>>>,
    /// Replies lost so far.
    lost: AtomicUsize,
}

pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                tokio::spawn(pipe(client, server, s.clone()));
            }
        });
        Proxy { addr, shared, task }
    }

    /// `redis://` URL of the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The next request whose bytes contain `pattern` is forwarded to the server, and
    /// the connection is cut before the next reply reaches the client.
    pub fn lose_reply_to(&self, pattern: &[u8]) {
        *self.shared.armed.lock().unwrap() = Some(pattern.to_vec());
    }

    /// Disarms a loss that has not happened yet.
    pub fn disarm(&self) {
        *self.shared.armed.lock().unwrap() = None;
    }

    pub fn replies_lost(&self) -> usize {
        self.shared.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let cut = Arc::new(AtomicBool::new(false));
    // Set once the matching request is written to the server.
    let forwarded = Arc::new(AtomicBool::new(false));
    let (up_shared, up_cut, up_forwarded) = (shared.clone(), cut.clone(), forwarded.clone());
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        // The end of the previous read: a pattern may straddle two reads.
        let mut seen: Vec<u8> = Vec::new();
        loop {
            let n = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            seen.extend_from_slice(&buf[..n]);
            // Decided before the request is forwarded, so that its reply cannot slip through.
            let matched = {
                let mut armed = up_shared.armed.lock().unwrap();
                let matched = armed.as_ref().is_some_and(|p| seen.windows(p.len()).any(|w| w == p.as_slice()));
                let keep = armed.as_ref().map_or(0, |p| p.len().saturating_sub(1)).min(seen.len());
                seen.drain(..seen.len() - keep);
                if matched {
                    *armed = None;
                    up_cut.store(true, Ordering::SeqCst);
                }
                matched
            };
            if server_wr.write_all(&buf[..n]).await.is_err() {
                break;
            }
            if matched {
                // The client's later bytes are not forwarded: its connection is cut.
                up_forwarded.store(true, Ordering::SeqCst);
                break;
            }
        }
        server_wr
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server_rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            shared.lost.fetch_add(1, Ordering::SeqCst);
            break; // the reply is dropped and the client's connection cut
        }
        if client_wr.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if !cut.load(Ordering::SeqCst) {
        up.abort();
        return;
    }
    // The client's connection is cut now. The dropped reply may be an earlier request's:
    // the server must still read and apply the matching one, so the server connection is
    // drained (its replies dropped) until that request was written and the server answered
    // after it; closing with unread data would reset the connection and could discard it.
    drop(client_wr);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut answered_after = false;
    while !answered_after {
        let was_forwarded = forwarded.load(Ordering::SeqCst);
        match tokio::time::timeout_at(deadline, server_rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answered_after = was_forwarded,
            _ => break,
        }
    }
    let _ = up.await;
}
