//! `GET /health` (the process answers) and `GET /ready` (its backends answer).

use std::time::Duration;

use actix_web::{web, HttpResponse};

use super::AppState;

pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let limit = Duration::from_secs(2);
    let (store, sink) =
        tokio::join!(tokio::time::timeout(limit, state.store.ping()), tokio::time::timeout(limit, state.sink.ping()));
    let describe = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!("no answer within {limit:?}")),
    };
    let store = describe(store.map(|r| r.map_err(|e| e.to_string())));
    // The cluster may answer a ping yet refuse our writes (an expired key, a missing
    // privilege or index): then delivery is stalled, and that is the reason to give.
    let stalled = state.sink_health.stalled().map(|reason| format!("delivery stalled: {reason}"));
    let sink = describe(sink.map(|r| r.map_err(|e| e.to_string()))).or(stalled);
    let body = serde_json::json!({
        "status": if store.is_none() && sink.is_none() { "ready" } else { "not_ready" },
        "state": store.as_deref().unwrap_or("ok"),
        "sink": sink.as_deref().unwrap_or("ok"),
    });
    if store.is_none() && sink.is_none() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
