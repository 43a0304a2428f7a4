//! HTTP ingress (actix-web): routes, shared state, and the server.
//!
//! Routes: `POST /aggregate/` and `/aggregate` ([`ingest`]), `GET /documents/{id}`
//! ([`documents`]), `GET /health` and `/ready` ([`health`]), `GET /metrics`, and
//! `GET /openapi.json` ([`openapi`], which describes them all: keep it in step). The data
//! endpoints need the bearer token when one is configured ([`auth`]).

pub mod auth;
pub mod documents;
pub mod error;
pub mod health;
pub mod ingest;
pub mod openapi;

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

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
    /// Whether delivery is stalled by the cluster refusing us (`/ready` says why).
    pub sink_health: crate::delivery::SinkHealth,
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
pub fn server(listener: TcpListener, state: AppState, settings: &Settings) -> std::io::Result<Server> {
    let state = web::Data::new(state);
    let token = auth::BearerToken(settings.http.auth_token.clone());
    let openapi = web::Data::new(openapi::OpenApi::new(settings));
    let body_timeout = web::Data::new(ingest::BodyTimeout(settings.http.body_timeout));
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(token.clone())
            .app_data(openapi.clone())
            .app_data(body_timeout.clone())
            // A path that does not decode (`%FF`) names nothing: the JSON 404, not a text one.
            .app_data(
                web::PathConfig::default()
                    .error_handler(|e, _| error::ApiError::NotFound(format!("bad path: {e}")).into()),
            )
            .service(
                web::resource("/aggregate").wrap(from_fn(auth::require_token)).route(web::post().to(ingest::aggregate)),
            )
            .service(
                web::resource("/aggregate/")
                    .wrap(from_fn(auth::require_token))
                    .route(web::post().to(ingest::aggregate)),
            )
            .service(
                web::resource("/documents/{id}")
                    .wrap(from_fn(auth::require_token))
                    .route(web::get().to(documents::get)),
            )
            .route("/openapi.json", web::get().to(openapi::serve))
            .route("/health", web::get().to(health::health))
            .route("/ready", web::get().to(health::ready))
            .route("/metrics", web::get().to(metrics))
            .default_service(web::to(not_found))
    })
    // Headers get `http.body_timeout` too (actix answers 408); the body's own timeout is in
    // `ingest`. A connection being closed gets a second to say goodbye, no more.
    .client_request_timeout(settings.http.body_timeout)
    .client_disconnect_timeout(std::time::Duration::from_secs(1))
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

/// Answers what no route takes: a known path asked with another method gets 405 with
/// `Allow` (`/aggregate*` takes POST, every other path GET), anything else 404.
async fn not_found(req: HttpRequest) -> HttpResponse {
    if let Some(pattern) = req.resource_map().match_pattern(req.path()) {
        let allow = if pattern.starts_with("/aggregate") { "POST" } else { "GET" };
        let message = format!("{pattern} answers {allow}, not {}", req.method());
        return HttpResponse::MethodNotAllowed()
            .insert_header(("Allow", allow))
            .json(serde_json::json!({"error": {"code": "method_not_allowed", "message": message}}));
    }
    HttpResponse::NotFound().json(serde_json::json!({"error": {"code": "not_found", "message": "no such endpoint"}}))
}
