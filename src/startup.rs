//! The composition root: the pool, the listener, the services, the
//! background tasks, and the drain on shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    coordinator::{Coordinator, CoordinatorConfig},
    grpc::{CoordinatorApi, CoordinatorServiceServer},
    maintenance, proto,
    pruner::EventPruner,
    rescuer::Rescuer,
    store::{KEPT_CHECK_INTERVAL, PoolSettings, Store},
    sweeper::CursorSweeper,
    wakeup::Wakeup,
};

/// The gRPC service name whose health follows the database.
pub const SERVICE_NAME: &str = "billing.coordinator.v1.CoordinatorService";

/// Connections kept apart for the rescuer, the cursor sweeper, the event
/// pruner and readiness checks, besides the `--db-max-connections` that requests use.
pub const BACKGROUND_CONNECTIONS: u32 = 3;

/// Everything `serve` needs, already validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// PostgreSQL URL.
    pub database_url: String,
    /// Pool settings.
    pub pool: PoolSettings,
    /// gRPC listen address (port 0 picks a free one).
    pub listen_addr: SocketAddr,
    /// Apply migrations before serving.
    pub migrate: bool,
    /// Lease bounds and defaults.
    pub coordinator: CoordinatorConfig,
    /// Time between rescuer passes; `None` turns the rescuer off.
    pub rescue_interval: Option<Duration>,
    /// How long audit events are kept; `None` keeps them forever.
    pub audit_retention: Option<Duration>,
    /// Time between readiness checks of the database.
    pub health_interval: Duration,
    /// How long a drain waits for in-flight calls.
    pub shutdown_grace: Duration,
}

/// A server bound to its port, ready to run.
pub struct Application {
    listener: TcpListener,
    store: Store,
    settings: Settings,
}

impl Application {
    /// Binds the listener and, if asked, migrates the database.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let store = Store::connect_lazy(&settings.database_url, &settings.pool)?;
        if settings.migrate {
            store.migrate().await.context("applying migrations")?;
        }
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("listening on {}", settings.listen_addr))?;
        Ok(Self {
            listener,
            store,
            settings,
        })
    }

    /// The store the server uses (tests drive its maintenance by hand).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.settings.listen_addr)
    }

    /// Serves until `shutdown` completes, then drains: readiness goes
    /// NOT_SERVING, new connections are refused, long-polls return at once,
    /// in-flight calls finish (up to the grace period), and the pool closes.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            store,
            settings,
        } = self;
        let stopping = CancellationToken::new();
        let wakeup = Wakeup::new();
        let coordinator = Arc::new(Coordinator::new(
            store.clone(),
            settings.coordinator.clone(),
            wakeup.clone(),
            stopping.clone(),
        ));

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
            .await;

        // Background work gets connections of its own: when requests hold the
        // whole pool, expired leases must still come back and readiness must
        // still tell the database's state, not the pool's.
        let background = store.with_own_pool(&settings.database_url, BACKGROUND_CONNECTIONS)?;
        let mut tasks = JoinSet::new();
        tasks.spawn(wakeup.listen(store.clone(), stopping.clone()));
        tasks.spawn(watch_database(
            background.clone(),
            health.clone(),
            settings.health_interval,
            stopping.clone(),
        ));
        if let Some(interval) = settings.rescue_interval {
            let mut rescuer = Rescuer::new(background.clone(), settings.coordinator.backoff);
            rescuer.interval = interval;
            tasks.spawn(rescuer.run(stopping.clone()));
        }
        tasks.spawn(CursorSweeper::new(background.clone()).run(stopping.clone()));
        tasks.spawn(maintenance::every(
            KEPT_CHECK_INTERVAL,
            stopping.clone(),
            {
                let store = store.clone();
                move || std::future::ready(store.release_stale_funnel_connections())
            },
            |released| {
                if released > 0 {
                    tracing::debug!(released, "handed idle funnel connections back to the pool");
                }
            },
        ));
        if let Some(retention) = settings.audit_retention {
            tasks.spawn(EventPruner::new(background.clone(), retention).run(stopping.clone()));
        }

        let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
        // grpcurl 1.8 speaks only v1alpha.
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .context("building reflection v1alpha")?;

        let drain_started = CancellationToken::new();
        let on_signal = {
            let health = health.clone();
            let stopping = stopping.clone();
            let drain_started = drain_started.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: draining in-flight calls");
                health
                    .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                    .await;
                health
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
                stopping.cancel();
                drain_started.cancel();
            }
        };

        tracing::info!(addr = %listener.local_addr()?, "serving billing.coordinator.v1");
        // `tcp_nodelay` below only applies to sockets tonic accepts itself.
        // Ours need it too: with Nagle's algorithm on, a response written in
        // several pieces waits for the client's delayed ACK, about 40 ms.
        let incoming = TcpListenerStream::new(listener).map(|accepted| {
            accepted.inspect(|stream| {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::warn!(%error, "cannot turn off Nagle's algorithm on a connection");
                }
            })
        });
        let server = Server::builder()
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(CoordinatorServiceServer::new(CoordinatorApi::new(
                coordinator,
            )))
            .serve_with_incoming_shutdown(incoming, on_signal);
        tokio::pin!(server);
        let grace = settings.shutdown_grace;
        let served = tokio::select! {
            served = &mut server => served,
            () = async {
                drain_started.cancelled().await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "in-flight calls did not finish within the grace period");
                Ok(())
            }
        };

        stopping.cancel();
        while tasks.join_next().await.is_some() {}
        store.close().await;
        background.close().await;
        served.context("serving gRPC")
    }
}

/// Reflection over every message a client may meet, including the
/// `google.rpc` error details, so grpcurl can decode them.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// Keeps the coordinator service's health in step with the database, so a
/// database outage takes the replica out of load balancing without making
/// liveness (the whole server, "") fail and the pod restart.
async fn watch_database(
    store: Store,
    health: HealthReporter,
    interval: Duration,
    stopping: CancellationToken,
) {
    let mut serving = false;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stopping.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let up = tokio::select! {
            biased;
            () = stopping.cancelled() => return,
            ping = tokio::time::timeout(interval.max(Duration::from_secs(1)), store.ping()) => {
                matches!(ping, Ok(Ok(())))
            }
        };
        if up != serving && !stopping.is_cancelled() {
            serving = up;
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            tracing::info!(database_up = up, "coordinator readiness changed");
            health.set_service_status(SERVICE_NAME, status).await;
        }
    }
}
