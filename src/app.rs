//! Putting keygate together: load the first snapshot, bind the configured listeners, follow the
//! snapshot source, and shut everything down together. `main` and the integration tests share
//! this one path; tests bind `127.0.0.1:0` and read the addresses back from [`App`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::authz_http::AuthzState;
use crate::config::{RuntimeFlavor, Settings};
use crate::ext_authz::ExtAuthzState;
use crate::proxy::{self, ProxyState};
use crate::ratelimit::RateLimits;
use crate::snapshot::source::{Source, SourceError};
use crate::snapshot::SnapshotStore;
use crate::telemetry::Front;
use crate::tls::{TlsServer, ALPN_GRPC, ALPN_HTTP};

/// Why keygate could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("usage reports: {0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Tls {
        what: &'static str,
        source: crate::tls::TlsError,
    },
}

/// A running keygate.
pub struct App {
    pub proxy_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub authz_http_addr: Option<SocketAddr>,
    pub ext_authz_addr: Option<SocketAddr>,
    pub sync_addr: Option<SocketAddr>,
    pub store: Arc<SnapshotStore>,
    /// The rate limiters every front shares.
    pub limits: Arc<RateLimits>,
    shutdown: crate::config::ShutdownSettings,
    /// True once shutdown begins: readiness and gRPC health turn false.
    closing: watch::Sender<bool>,
    /// The same, read on the proxy's request path.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// True once the fronts stop accepting (after `shutdown.delay`).
    stop_fronts: watch::Sender<bool>,
    /// The fronts (their accept loops and drains).
    fronts: JoinSet<()>,
    /// True once the fronts have drained: the snapshot source, admin and sweepers stop.
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Proxy threads of the thread-per-core layout (beyond the caller's own runtime).
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The usage reporter, flushed once the fronts have drained.
    reporter: Option<tokio::task::JoinHandle<crate::usage::report::Reporter>>,
}

/// Run `tick` every `period` until `stop` resolves (the state sweepers).
async fn every(period: Duration, stop: impl Future<Output = ()>, mut tick: impl FnMut()) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(period) => tick(),
        }
    }
}

/// Resolves once `stop` turns true.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// A non-blocking std listener with SO_REUSEPORT, so several threads can each own one on the
/// same address and the kernel spreads connections among them.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A listener's TLS configuration, read now (a bad file stops start-up) and then watched for
/// changes until shutdown.
fn tls_server(
    what: &'static str,
    settings: Option<&crate::config::ServerTlsSettings>,
    alpn: &'static [&'static [u8]],
    tasks: &mut JoinSet<()>,
    rx: &watch::Receiver<bool>,
) -> Result<Option<Arc<TlsServer>>, AppError> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    let server = TlsServer::new(what, settings.clone(), alpn)
        .map_err(|source| AppError::Tls { what, source })?;
    tasks.spawn(server.clone().watch(stopped(rx.clone())));
    Ok(Some(server))
}

/// The soft limit on open files (`ulimit -n`), from `/proc/self/limits` (Linux).
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Say so when the fronts may accept more connections than the process may open files: past
/// the file limit, accepts fail (and are retried) instead of excess connections being reset.
fn check_open_file_limit(settings: &Settings) {
    let fronts = [
        settings.proxy.is_some(),
        settings.ext_authz.is_some(),
        settings.authz_http.is_some(),
        settings.admin.is_some(),
        settings.sync_server.is_some(),
    ]
    .into_iter()
    .filter(|on| *on)
    .count() as u64;
    let wanted = (settings.limits.max_connections as u64).saturating_mul(fronts);
    if let Some(files) = open_file_limit() {
        if wanted > files {
            tracing::warn!(
                max_connections = settings.limits.max_connections,
                fronts,
                open_file_limit = files,
                "limits.max_connections on every front exceeds the open-file limit (ulimit -n); raise the limit or lower max_connections"
            );
        }
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { what, addr, source })
}

/// Load the snapshot (a failure is logged and the fronts answer `snapshot_unavailable` until a
/// good one arrives), bind every configured listener, and start serving.
pub async fn start(settings: Settings) -> Result<App, AppError> {
    let store = Arc::new(SnapshotStore::configured(
        settings.snapshot.max_staleness,
        settings.sync_server.is_some(),
    ));
    let source = Source::start(&settings.snapshot, &store).await?;
    check_open_file_limit(&settings);
    let limits = Arc::new(RateLimits::new(settings.rate_limit.clone()));
    let usage = Arc::new(crate::usage::Usage::new(crate::decision::now_ms()));
    let idempotency = settings
        .idempotency
        .map(|i| Arc::new(crate::idempotency::Idempotency::new(i)));

    let telemetry =
        crate::telemetry::Telemetry::new(settings.limits.max_connections, settings.log.decisions);
    let per_ip = settings
        .proxy
        .as_ref()
        .map_or(0, |p| p.max_connections_per_ip);
    let telemetry = Arc::new(telemetry.limit_per_ip(crate::telemetry::Front::Proxy, per_ip));
    let (stop, rx) = watch::channel(false);
    let (stop_fronts, fronts_rx) = watch::channel(false);
    let (closing, closing_rx) = watch::channel(false);
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    let mut fronts = JoinSet::new();
    let drain = settings.shutdown.drain_timeout;

    let mut proxy_addr = None;
    let mut threads = Vec::new();
    // The TLS listeners, for /metrics.
    let mut certificates = Vec::new();
    if let Some(p) = settings.proxy.clone() {
        let tls = tls_server("proxy", p.tls.as_ref(), ALPN_HTTP, &mut tasks, &rx)?;
        certificates.extend(tls.clone());
        let upstream_tls = p
            .upstream_tls
            .as_ref()
            .map(crate::upstream::UpstreamTls::new)
            .transpose()
            .map_err(|source| AppError::Tls {
                what: "proxy upstream",
                source,
            })?;
        if let Some(u) = &upstream_tls {
            tasks.spawn(u.clone().watch(stopped(rx.clone())));
        }
        let new_state = || {
            Arc::new(
                ProxyState::new(
                    p.clone(),
                    settings.policy.clone(),
                    settings.headers.clone(),
                    store.clone(),
                    limits.clone(),
                    usage.clone(),
                    idempotency.clone(),
                    &telemetry,
                    settings.limits,
                    draining.clone(),
                )
                .with_tls(tls.clone(), upstream_tls.clone()),
            )
        };
        if settings.runtime.flavor == RuntimeFlavor::ThreadPerCore {
            // One SO_REUSEPORT listener per thread, each served by its own single-threaded
            // runtime with its own upstream pool: no cross-thread wake-ups on the request path.
            let n = match settings.runtime.worker_threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            };
            let first = reuseport_listener(p.listen).map_err(|source| AppError::Bind {
                what: "proxy.listen",
                addr: p.listen,
                source,
            })?;
            let addr = first.local_addr().map_err(|source| AppError::Bind {
                what: "proxy.listen",
                addr: p.listen,
                source,
            })?;
            proxy_addr = Some(addr);
            for i in 1..n {
                let std_listener = reuseport_listener(addr).map_err(|source| AppError::Bind {
                    what: "proxy.listen",
                    addr,
                    source,
                })?;
                let state = new_state();
                let stop = stopped(fronts_rx.clone());
                // The thread's drain is part of the fronts' drain: shutdown waits for it
                // before stopping the snapshot source and the admin listener.
                let (drained, done) = tokio::sync::oneshot::channel::<()>();
                let thread = std::thread::Builder::new()
                    .name(format!("keygate-proxy-{i}"))
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a current-thread runtime builds");
                        rt.block_on(async move {
                            match TcpListener::from_std(std_listener) {
                                Ok(l) => proxy::serve(l, state, stop, drain).await,
                                Err(e) => tracing::error!(error = %e, "proxy listener lost"),
                            }
                        });
                        let _ = drained.send(());
                    })
                    .expect("a proxy thread starts");
                fronts.spawn(async move {
                    let _ = done.await;
                });
                threads.push(thread);
            }
            let listener = TcpListener::from_std(first).map_err(|source| AppError::Bind {
                what: "proxy.listen",
                addr,
                source,
            })?;
            fronts.spawn(proxy::serve(
                listener,
                new_state(),
                stopped(fronts_rx.clone()),
                drain,
            ));
        } else {
            let listener = bind("proxy.listen", p.listen).await?;
            proxy_addr = listener.local_addr().ok();
            fronts.spawn(proxy::serve(
                listener,
                new_state(),
                stopped(fronts_rx.clone()),
                drain,
            ));
        }
    }
    let mut authz_http_addr = None;
    if let Some(front) = settings.authz_http.clone() {
        let listener = bind("authz_http.listen", front.listen).await?;
        authz_http_addr = listener.local_addr().ok();
        let state = Arc::new(AuthzState {
            settings: front,
            policy: settings.policy.clone(),
            names: settings.headers.clone(),
            store: store.clone(),
            limits: limits.clone(),
            usage: usage.clone(),
            shard: telemetry.shard(Front::AuthzHttp),
            connections: telemetry.connections(Front::AuthzHttp),
            resources: settings.limits,
            retold: Default::default(),
        });
        fronts.spawn(crate::authz_http::serve(
            listener,
            state,
            stopped(fronts_rx.clone()),
            drain,
        ));
    }
    let mut ext_authz_addr = None;
    if let Some(front) = settings.ext_authz.clone() {
        let listener = bind("ext_authz.listen", front.listen).await?;
        ext_authz_addr = listener.local_addr().ok();
        let tls = tls_server("ext_authz", front.tls.as_ref(), ALPN_GRPC, &mut tasks, &rx)?;
        certificates.extend(tls.clone());
        let state = Arc::new(ExtAuthzState {
            settings: front,
            policy: settings.policy.clone(),
            names: settings.headers.clone(),
            store: store.clone(),
            limits: limits.clone(),
            usage: usage.clone(),
            closing: closing_rx.clone(),
            shard: telemetry.shard(Front::ExtAuthz),
            connections: telemetry.connections(Front::ExtAuthz),
            resources: settings.limits,
            buffers: Arc::new(crate::ext_authz::Buffers::new(settings.ext_authz_limits)),
        });
        fronts.spawn(crate::ext_authz::serve(
            listener,
            state,
            tls,
            stopped(fronts_rx.clone()),
            drain,
        ));
    }
    // Bound here, where it always was (a busy port fails start-up before the hub runs);
    // served after the hub, so that it knows every TLS listener.
    let admin_listener = match settings.admin {
        Some(addr) => Some(bind("admin.listen", addr).await?),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let mut sync_addr = None;
    let mut sync_hub = None;
    if let Some(sync) = settings.sync_server.clone() {
        let listener = bind("sync_server.listen", sync.listen).await?;
        sync_addr = listener.local_addr().ok();
        let tls = tls_server("sync_server", sync.tls.as_ref(), ALPN_GRPC, &mut tasks, &rx)?;
        if tls.is_none() && !sync.listen.ip().is_loopback() {
            // The token keeps strangers from asking; it does not hide the answer on the way.
            tracing::warn!(
                listen = %sync.listen,
                "sync_server is plain h2c on a network address: the token and every key digest cross the network unencrypted; set sync_server.tls_cert (or run inside a mesh that encrypts)"
            );
        }
        certificates.extend(tls.clone());
        let hub =
            crate::sync::server::Hub::new(store.clone(), sync, settings.limits.max_connections);
        sync_hub = Some(hub.clone());
        fronts.spawn(crate::sync::server::serve(
            listener,
            hub,
            tls,
            settings.limits,
            drain,
            stopped(fronts_rx.clone()),
        ));
    }
    if let Some(listener) = admin_listener {
        tasks.spawn(crate::admin::serve(
            listener,
            crate::admin::AdminState {
                store: store.clone(),
                usage: usage.clone(),
                limits: limits.clone(),
                telemetry: telemetry.clone(),
                closing: closing_rx.clone(),
                fronts: [
                    (proxy_addr.is_some(), Front::Proxy),
                    (ext_authz_addr.is_some(), Front::ExtAuthz),
                    (authz_http_addr.is_some(), Front::AuthzHttp),
                ]
                .into_iter()
                .filter_map(|(on, f)| on.then_some(f))
                .collect(),
                resources: settings.limits,
                tls: certificates,
                hub: sync_hub,
            },
            stopped(rx.clone()),
        ));
    }
    tasks.spawn(source.run(store.clone(), stopped(rx.clone())));
    let reporter = match settings.usage_report.clone() {
        Some(r) => {
            let reporter =
                crate::usage::report::Reporter::new(r, usage.clone(), crate::decision::now_ms())
                    .map_err(AppError::Usage)?;
            Some(tokio::spawn(reporter.run(stopped(rx.clone()))))
        }
        None => None,
    };
    if let Some(store) = idempotency.as_ref().and_then(|i| i.local()).cloned() {
        tasks.spawn(every(
            Duration::from_secs(60),
            stopped(rx.clone()),
            move || {
                store.sweep();
            },
        ));
    }
    let sweeper = limits.clone();
    tasks.spawn(every(
        Duration::from_secs(30),
        stopped(rx.clone()),
        move || {
            sweeper.limiter.sweep();
        },
    ));

    tracing::info!(proxy = ?proxy_addr, ext_authz = ?ext_authz_addr, authz_http = ?authz_http_addr, admin = ?admin_addr, sync = ?sync_addr, "keygate started");
    Ok(App {
        proxy_addr,
        admin_addr,
        authz_http_addr,
        ext_authz_addr,
        sync_addr,
        store,
        limits,
        shutdown: settings.shutdown,
        closing,
        draining,
        stop_fronts,
        fronts,
        stop,
        tasks,
        threads,
        reporter,
    })
}

impl App {
    /// Shut down in the order a load balancer needs: readiness turns false at once while the
    /// listeners keep accepting for `shutdown.delay` (so endpoints can be removed without
    /// refusing anyone), then the fronts stop accepting and in-flight requests and streams
    /// finish for up to `shutdown.drain_timeout`; the snapshot source and the admin listener
    /// run until then, so revocations still apply and probes still answer.
    pub async fn shutdown(mut self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.closing.send(true);
        let crate::config::ShutdownSettings {
            delay,
            drain_timeout,
        } = self.shutdown;
        if !delay.is_zero() {
            tracing::info!(delay = ?delay, "shutting down: not ready, still accepting");
            tokio::time::sleep(delay).await;
        }
        tracing::info!(drain_timeout = ?drain_timeout, "shutting down: no longer accepting, draining");
        let _ = self.stop_fronts.send(true);
        // Every front drains for at most drain_timeout; a peer that keeps a connection open
        // past that (an Envoy holding its gRPC channel) must not keep the process alive.
        let joined = tokio::time::timeout(drain_timeout + Duration::from_millis(500), async {
            while self.fronts.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            tracing::warn!("shutdown: fronts still busy after the drain timeout; stopping them");
            self.fronts.abort_all();
        }
        let _ = self.stop.send(true);
        let joined = tokio::time::timeout(Duration::from_secs(2), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            self.tasks.abort_all();
        }
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        // Counts are final once the fronts have drained: report them.
        if let Some(reporter) = self.reporter.take() {
            if let Ok(reporter) = reporter.await {
                reporter.flush().await;
            }
        }
    }
}

/// Run until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    let app = start(settings).await?;
    shutdown.await;
    tracing::info!("shutting down");
    app.shutdown().await;
    Ok(())
}
