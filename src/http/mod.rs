//! HTTP ingress (actix-web): routes, shared state, and the server.

pub mod error;
pub mod health;
pub mod ingest;

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{web, App, HttpResponse, HttpServer};

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::ingest::Limits;
use crate::model::Schema;
use crate::shard::Router;
use crate::sink::SinkClient;
use crate::state::StateStore;

/// What every request handler shares.
pub struct AppState {
    pub router: Router,
    pub schema: Arc<Schema>,
    pub limits: Limits,
    pub max_body_bytes: usize,
    pub max_batch_items: usize,
    pub store: StateStore,
    pub sink: SinkClient,
    pub metrics: Arc<Metrics>,
    pub durability: Durability,
}

/// What ingress needs of the durability settings.
#[derive(Debug, Clone, Copy)]
pub struct Durability {
    pub ack: crate::config::AckMode,
    pub ack_timeout: std::time::Duration,
    pub enqueue_timeout: std::time::Duration,
    pub max_resident_bytes: usize,
}

/// Builds the server on an already bound listener. It does not handle signals: the caller
/// decides when to stop it.
pub fn server(
    listener: TcpListener,
    state: AppState,
    settings: &Settings,
) -> std::io::Result<Server> {
    let state = web::Data::new(state);
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/aggregate", web::post().to(ingest::aggregate))
            .route("/aggregate/", web::post().to(ingest::aggregate))
            .route("/health", web::get().to(health::health))
            .route("/ready", web::get().to(health::ready))
            .route("/metrics", web::get().to(metrics))
            .default_service(web::to(not_found))
    })
    .listen(listener)?
    .disable_signals()
    .shutdown_timeout(30);
    if settings.http.workers > 0 {
        server = server.workers(settings.http.workers);
    }
    Ok(server.run())
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.render())
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound()
        .json(serde_json::json!({"error": {"code": "not_found", "message": "no such endpoint"}}))
}
