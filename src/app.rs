//! Assembles the service: the pipeline (state store, sink, bulk writer, shard actors)
//! and the HTTP server in front of it.
//!
//! Shutdown order: stop taking requests (in-flight ones finish), stop the shards (each
//! drains its mailbox and flushes its dirty partials), which drops the writer's last
//! handles, so the writer sends what it holds and waits for its requests.

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::delivery::outbox::Maintenance;
use crate::delivery::{BulkWriter, InFlight, SinkHealth};
use crate::http::{self, AppState, Durability};
use crate::metrics::Metrics;
use crate::model::ingest::Limits;
use crate::model::Schema;
use crate::shard::actor::Stops;
use crate::shard::{Router, ShardActor};
use crate::sink::SinkClient;
use crate::state::StateStore;

/// The running actors behind ingress.
pub struct Pipeline {
    pub router: Router,
    pub schema: Arc<Schema>,
    pub store: StateStore,
    pub sink: SinkClient,
    pub metrics: Arc<Metrics>,
    /// Whether delivery is stalled by the cluster refusing us (for `/ready`).
    pub sink_health: SinkHealth,
    shards: Vec<JoinHandle<()>>,
    maintenance: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// Stops the shards and the maintenance actor.
    cancel: CancellationToken,
    /// Tells the writer to stop waiting for the sink and park what it holds.
    give_up: CancellationToken,
    shutdown_deadline: Duration,
}

impl Pipeline {
    /// Connects the backends, prepares the sink and starts the actors.
    pub async fn start(settings: &Settings) -> anyhow::Result<Pipeline> {
        Pipeline::start_with_sink(settings, SinkClient::new(settings)?).await
    }

    /// [`Pipeline::start`] with a sink built by the caller (the benchmark's observed sink).
    pub async fn start_with_sink(settings: &Settings, sink: SinkClient) -> anyhow::Result<Pipeline> {
        let schema = Schema::new(&settings.parts);
        let mut store = StateStore::connect(settings, &schema)
            .await
            .with_context(|| format!("cannot connect to the state store ({:?})", settings.state.backend))?;
        sink.prepare(settings, &schema).await.context("cannot prepare the sink")?;
        let metrics = Arc::new(Metrics::new());
        store.count_dropped_letters_in(metrics.dead_letters_dropped.clone());
        let (cancel, give_up) = (CancellationToken::new(), CancellationToken::new());
        let (in_flight, sink_health) = (InFlight::default(), SinkHealth::new(metrics.sink_stalled.clone()));
        let (writer_handle, writer) = BulkWriter::spawn(
            settings,
            schema.clone(),
            sink.clone(),
            store.clone(),
            metrics.clone(),
            (in_flight.clone(), sink_health.clone()),
            give_up.clone(),
        );
        let (handles, shards) = (0..settings.shard_count())
            .map(|i| {
                ShardActor::spawn(
                    i,
                    settings,
                    schema.clone(),
                    store.clone(),
                    writer_handle.clone(),
                    metrics.clone(),
                    Stops { cancel: cancel.clone(), give_up: give_up.clone() },
                )
            })
            .unzip();
        // Its first round, right away, resends what a previous run left in the outbox.
        let maintenance =
            Maintenance::spawn(settings, store.clone(), writer_handle, in_flight, metrics.clone(), cancel.clone());
        Ok(Pipeline {
            router: Router::new(handles),
            schema: Arc::new(schema),
            store,
            sink,
            metrics,
            sink_health,
            shards,
            maintenance,
            writer,
            cancel,
            give_up,
            shutdown_deadline: settings.durability.shutdown_deadline,
        })
    }

    /// Drains every actor: queued parts are applied, dirty partials reach the store,
    /// complete documents the sink, until the shutdown deadline; what the sink has not
    /// taken by then is parked in the store's outbox.
    pub async fn shutdown(self) {
        // The deadline holds for every step: shards and maintenance waiting on a full writer
        // (the sink is down) stop waiting and park too.
        let (deadline, give_up) = (self.shutdown_deadline, self.give_up.clone());
        let timer = tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            tracing::warn!("Shutdown deadline passed; parking undelivered documents in the state store.");
            give_up.cancel();
        });
        self.cancel.cancel();
        for shard in self.shards {
            let _ = shard.await;
        }
        let _ = self.maintenance.await;
        let _ = self.writer.await;
        timer.abort();
    }
}

/// The service: HTTP ingress and its pipeline.
pub struct Application {
    port: u16,
    server: Server,
    pipeline: Pipeline,
}

impl Application {
    /// Starts the pipeline and binds the listener (port 0 picks a free port).
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let pipeline = Pipeline::start(&settings).await?;
        let listener = TcpListener::bind(&settings.http.bind)
            .with_context(|| format!("cannot listen on {}", settings.http.bind))?;
        let port = listener.local_addr()?.port();
        let state = AppState {
            router: pipeline.router.clone(),
            schema: pipeline.schema.clone(),
            limits: Limits::from_settings(&settings),
            max_body_bytes: settings.http.max_body_bytes,
            max_batch_items: settings.http.max_batch_items,
            store: pipeline.store.clone(),
            sink: pipeline.sink.clone(),
            sink_health: pipeline.sink_health.clone(),
            metrics: pipeline.metrics.clone(),
            durability: Durability {
                ack: settings.durability.ack,
                ack_timeout: settings.durability.ack_timeout,
                enqueue_timeout: settings.durability.enqueue_timeout,
                max_resident_bytes: settings.shards.max_resident_bytes,
            },
        };
        let server = http::server(listener, state, &settings)?;
        Ok(Application { port, server, pipeline })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The router, to feed the pipeline without HTTP (benchmarks, tests).
    pub fn router(&self) -> &Router {
        &self.pipeline.router
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.pipeline.metrics.clone()
    }

    /// Serves until `shutdown` resolves (or the server fails), then drains the pipeline.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let mut server = tokio::spawn(self.server);
        let served = tokio::select! {
            result = &mut server => result,
            _ = shutdown => {
                tracing::info!("Shutting down: no new requests; draining the pipeline.");
                handle.stop(true).await;
                server.await
            }
        };
        self.pipeline.shutdown().await;
        tracing::info!("Stopped.");
        served.context("the HTTP server task failed")?.context("the HTTP server failed")
    }
}
