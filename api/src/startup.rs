//! Building and running the application: database, key sync, routes, background tasks,
//! reload and graceful shutdown.
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use poem::{EndpointExt, IntoEndpoint, Route, get};
use sea_orm::DatabaseConnection;

use crate::routes::documents::{admin_service, customer_service, doc_endpoints, worker_service};
use crate::routes::health;
use crate::settings::{ConfigSource, Settings};
use crate::state::{AppState, Runtime};

/// Every public route, wrapped in the request-context layer. `/metrics` is among them only
/// when `server.ops_bind` equals `server.bind` (otherwise it lives on the ops listener).
pub fn routes(state: Arc<AppState>) -> impl poem::Endpoint<Output = poem::Response> {
    let customer = customer_service();
    let worker = worker_service();
    let admin = admin_service();
    let (customer_ui, customer_spec) = doc_endpoints(&customer);
    let (worker_ui, worker_spec) = doc_endpoints(&worker);
    let (admin_ui, admin_spec) = doc_endpoints(&admin);
    let audit_state = Arc::clone(&state);
    let ctx_state = Arc::clone(&state);
    let server = &state.runtime().settings.server;
    let shared_ops = server.ops_shared();
    let mut route = Route::new()
        .nest(
            "/api/enterprise",
            customer.around(move |ep, req| {
                crate::middleware::customer_audit(ep, req, Arc::clone(&audit_state))
            }),
        )
        .nest("/api/internal/worker", worker)
        .nest("/api/admin", admin)
        .nest("/docs", customer_ui)
        .at("/openapi.json", customer_spec)
        .nest("/worker/docs", worker_ui)
        .at("/worker/openapi.json", worker_spec)
        .nest("/admin/docs", admin_ui)
        .at("/admin/openapi.json", admin_spec)
        .at("/healthz", get(health::healthz))
        .at("/readyz", get(health::readyz));
    if shared_ops {
        route = route.at("/metrics", get(health::metrics));
    }
    route
        .data(state)
        .around(move |ep, req| crate::middleware::request_context(ep, req, Arc::clone(&ctx_state)))
        .into_endpoint()
}

/// The operations listener: `/metrics`, `/healthz` and `/readyz`, for operators and
/// scrapers only.
pub fn ops_routes(state: Arc<AppState>) -> impl poem::Endpoint<Output = poem::Response> {
    Route::new()
        .at("/metrics", get(health::metrics))
        .at("/healthz", get(health::healthz))
        .at("/readyz", get(health::readyz))
        .data(state)
        .catch_all_error(|e| async move { crate::error::catch_all(e) })
        .into_endpoint()
}

/// Connects, migrates, syncs keys and indexes the policy.
pub async fn prepare(
    settings: Settings,
    source: Option<ConfigSource>,
) -> anyhow::Result<Arc<AppState>> {
    let db = crate::db::connect(&settings.database).await?;
    crate::db::migrate(&db).await?;
    prepare_with_db(settings, source, db).await
}

/// Like [`prepare`] with an already migrated connection (tests use this).
pub async fn prepare_with_db(
    settings: Settings,
    source: Option<ConfigSource>,
    db: DatabaseConnection,
) -> anyhow::Result<Arc<AppState>> {
    crate::telemetry::metrics();
    crate::telemetry::describe();
    let page_limit = crate::db::PageLimit::default();
    let writer = crate::db::writer_for(&db, &settings.database, &page_limit).await?;
    let ids = crate::service::keys::sync(&writer, &settings)
        .await
        .context("syncing keys")?;
    let clock = crate::clock::Clock::from_env().map_err(anyhow::Error::msg)?;
    let strangers =
        crate::strangers::Throttle::new(settings.server.unauthenticated_per_min, clock.clone());
    let refused_keys =
        crate::strangers::Throttle::new(settings.server.refused_per_min, clock.clone());
    let revoked = crate::service::keys::disabled_ids(&db)
        .await
        .context("reading disabled keys")?;
    let reloads_seen = crate::store::keys::reload_count(&db)
        .await
        .context("reading the reload count")?;
    let lanes = match writer.get_database_backend() {
        sea_orm::DbBackend::Sqlite => 1,
        _ => settings.database.write_lanes as usize,
    };
    let writes = crate::store::commit::Writes::start(writer.clone(), lanes);
    crate::telemetry::register_known_series(settings.keys.keys().map(String::as_str));
    let runtime = Runtime::new(settings, &ids);
    Ok(Arc::new(AppState {
        writes,
        db,
        writer,
        runtime: ArcSwap::from_pointee(runtime),
        source,
        reload_lock: tokio::sync::Mutex::new(()),
        reloads_seen: std::sync::atomic::AtomicI64::new(reloads_seen),
        revoked: ArcSwap::from_pointee(revoked),
        clock,
        webhook_wakeup: tokio::sync::Notify::new(),
        webhook_back: Default::default(),
        strangers,
        refused_keys,
        readiness: crate::readiness::Readiness::default(),
        page_limit,
        reaper_gate: tokio::sync::Mutex::new(()),
    }))
}

/// A bound, ready server: the public listener and, unless shared, the ops listener.
pub struct Application {
    port: u16,
    listener: tokio::net::TcpListener,
    ops: Option<tokio::net::TcpListener>,
    ops_port: Option<u16>,
    state: Arc<AppState>,
}

impl Application {
    /// Prepares the state and binds `server.bind` (port 0 picks a free port).
    pub async fn build(settings: Settings, source: Option<ConfigSource>) -> anyhow::Result<Self> {
        let bind = settings.server.bind.clone();
        let state = prepare(settings, source).await?;
        Self::bind(state, &bind).await
    }

    /// Binds an already prepared state on `bind`, and the ops listener on `server.ops_bind`
    /// (unless it equals `server.bind`). An ops address that cannot be bound is logged and
    /// skipped: the customer API does not depend on the metrics port.
    pub async fn bind(state: Arc<AppState>, bind: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding {bind}"))?;
        Self::with_listener(state, listener).await
    }

    /// Like [`Application::bind`] on a listener the caller already bound (a test that restarts
    /// a server keeps its port this way instead of releasing it and binding it again).
    pub async fn with_listener(
        state: Arc<AppState>,
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<Self> {
        let port = listener.local_addr()?.port();
        let server = state.runtime().settings.server.clone();
        let (ops, ops_port) = if server.ops_shared() {
            (None, Some(port))
        } else {
            match tokio::net::TcpListener::bind(&server.ops_bind).await {
                Ok(l) => {
                    let p = l.local_addr()?.port();
                    (Some(l), Some(p))
                }
                Err(e) => {
                    tracing::error!(
                        ops_bind = %server.ops_bind,
                        error = %e,
                        "cannot bind the ops listener: /metrics is not served"
                    );
                    (None, None)
                }
            }
        };
        Ok(Self {
            port,
            listener,
            ops,
            ops_port,
            state,
        })
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of the ops listener (`/metrics`), if it is served.
    pub fn ops_port(&self) -> Option<u16> {
        self.ops_port
    }

    /// The shared state.
    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls (bounded by the grace period).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let server = self.state.runtime().settings.server.clone();
        let grace = server.shutdown_grace;
        let limits = crate::server::ConnectionLimits {
            header_timeout: server.header_timeout,
            idle_timeout: server.idle_timeout,
            max_connections: server.max_connections as usize,
            shutdown_grace: grace,
        };
        let background = spawn_background(Arc::clone(&self.state));
        let revocation = spawn_revocation_watch(Arc::clone(&self.state));
        let reaper = spawn_reaper(Arc::clone(&self.state));
        // The first `/readyz` already has an answer.
        self.state.readiness.set(probe_store(&self.state).await);
        let probe = spawn_store_probe(Arc::clone(&self.state));
        let stop = Arc::new(tokio::sync::Notify::new());
        let dispatcher = self.state.runtime().settings.webhooks.dispatch.then(|| {
            tokio::spawn(crate::service::webhooks::run_dispatcher(
                Arc::clone(&self.state),
                Arc::clone(&stop),
            ))
        });
        let (ops_stop, ops_stopped) = tokio::sync::oneshot::channel::<()>();
        let ops = self.ops.map(|listener| {
            let ep = ops_routes(Arc::clone(&self.state)).boxed();
            tokio::spawn(crate::server::serve(listener, ep, limits, async move {
                let _ = ops_stopped.await;
            }))
        });
        let app = routes(Arc::clone(&self.state)).boxed();
        let result = crate::server::serve(self.listener, app, limits, shutdown).await;
        let _ = ops_stop.send(());
        if let Some(ops) = ops {
            let _ = ops.await;
        }
        background.abort();
        revocation.abort();
        reaper.abort();
        probe.abort();
        if let Some(d) = dispatcher {
            // Let the attempts in flight finish and be recorded, then stop.
            stop.notify_waiters();
            stop.notify_one();
            let _ = tokio::time::timeout(grace, d).await;
        }
        self.state.strangers.flush_all(&self.state.writes).await;
        self.state.refused_keys.flush_all(&self.state.writes).await;
        result
    }

    /// Serves until SIGINT or SIGTERM; SIGHUP reloads the configuration.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        spawn_sighup(Arc::clone(&self.state));
        self.run_until(shutdown_signal()).await
    }
}

/// Every two seconds, learns which keys are disabled in the database, so that a key revoked by
/// another node's reload is refused here within seconds, and whether another node reloaded its
/// configuration, to read this node's files again (see [`AppState::follow_reload`]).
fn spawn_revocation_watch(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REVOCATION_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match crate::service::keys::disabled_ids(&state.db).await {
                Ok(ids) => state.revoked.store(Arc::new(ids)),
                Err(e) => tracing::warn!(error = %e, "reading disabled keys failed"),
            }
            match crate::store::keys::reload_count(&state.db).await {
                Ok(n) if n > state.reloads_seen.load(std::sync::atomic::Ordering::SeqCst) => {
                    state.follow_reload(n).await;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading the reload count failed"),
            }
        }
    })
}

/// Every [`REAP_INTERVAL`], settles expired leases (requeue, fail the last attempt, cancel those
/// of cancelled batches), whether or not any worker claims, and enforces the completion
/// windows that ended (queued items expire and are released).
fn spawn_reaper(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _pass = state.reaper_gate.lock().await;
            let runtime = state.runtime();
            match crate::service::leases::reap_expired(&state.db, &state.writes, &runtime).await {
                Ok(r) if r.requeued + r.settled > 0 => {
                    state.webhook_wakeup.notify_one();
                    tracing::info!(
                        requeued = r.requeued,
                        settled = r.settled,
                        "expired leases reaped"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reaping expired leases failed"),
            }
            match crate::service::windows::expire_due(&state.db, &state.writes, &runtime).await {
                Ok(n) if n > 0 => {
                    state.webhook_wakeup.notify_one();
                    tracing::info!(batches = n, "completion windows enforced");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "enforcing completion windows failed"),
            }
        }
    })
}

/// One readiness probe of the store (see [`crate::readiness`]).
async fn probe_store(state: &AppState) -> crate::readiness::StoreState {
    crate::readiness::probe(&state.db, &state.writes, state.clock.now()).await
}

/// Probes the store every [`crate::readiness::PROBE_INTERVAL`] for the life of the process.
fn spawn_store_probe(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::readiness::PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            state.readiness.set(probe_store(&state).await);
        }
    })
}

/// How often the lease reaper runs on each node.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// How often each node re-reads the disabled keys.
pub const REVOCATION_REFRESH: Duration = Duration::from_secs(2);

/// Periodic upkeep: queue gauges (so a scrape costs no query), metric histograms, the
/// aggregated audit of unauthenticated calls, and old rate-limit windows.
fn spawn_background(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            n += 1;
            // Histograms keep their samples until drained: drain them even when nobody scrapes.
            crate::telemetry::metrics().run_upkeep();
            if let Err(e) = crate::telemetry::sample_gauges(&state.db).await {
                tracing::warn!(error = %e, "sampling queue gauges failed");
            }
            let thresholds: Vec<(i64, i64)> = state
                .runtime()
                .accounts
                .iter()
                .filter_map(|(id, k)| k.policy.low_credit_threshold.map(|t| (*id, t)))
                .collect();
            if let Err(e) = crate::telemetry::sample_low_credits(&state.db, &thresholds).await {
                tracing::warn!(error = %e, "sampling low-credit gauge failed");
            }
            // Pruning last: the gauges are exported first, also at start.
            if n % 12 == 1 {
                // The application's clock, as every count and row is stamped with it.
                let now = state.clock.now();
                if let Err(e) = crate::service::rate_limit::prune(&state.writer, now).await {
                    tracing::warn!(error = %e, "pruning rate-limit windows failed");
                }
                let retention = state.runtime().settings.retention;
                if let Err(e) =
                    crate::service::retention::prune(&state.writer, &retention, now).await
                {
                    tracing::warn!(error = %e, "retention pruning failed");
                }
            }
            state.strangers.flush_finished(&state.writes).await;
            state.refused_keys.flush_finished(&state.writes).await;
        }
    })
}

#[cfg(unix)]
fn spawn_sighup(state: Arc<AppState>) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; reload with the admin API instead");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading configuration");
            let _ = state.reload().await;
        }
    });
}

#[cfg(not(unix))]
fn spawn_sighup(_state: Arc<AppState>) {}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested: draining in-flight requests");
}
