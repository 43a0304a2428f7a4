//! The tests' Elasticsearch stand-in as a process, for end-to-end benchmarks on machines
//! without Elasticsearch: `cargo run --release --example es_standin -- 127.0.0.1:9200`.
//! It follows the `_bulk` contract strictly (see tests/api/support/es_standin.rs); it is
//! not a search engine, and production code never knows about it.

#[path = "../tests/api/support/es_standin.rs"]
mod es_standin;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9200".into());
    let standin = es_standin::EsStandin::start_on(addr.parse().expect("an address:port")).await.expect("cannot bind");
    eprintln!("Elasticsearch stand-in listening on {}", standin.url());
    tokio::signal::ctrl_c().await.expect("signal handler");
    let stats = standin.stats();
    eprintln!("bulk requests {}, items applied {}", stats.bulk_requests, stats.items_applied);
}
