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

use crate::config::Settings;
use crate::proxy::{self, ProxyState};
use crate::snapshot::file::FileSource;
use crate::snapshot::SnapshotStore;

/// Why keygate could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running keygate.
pub struct App {
    pub proxy_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub store: Arc<SnapshotStore>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Resolves once `stop` turns true.
fn stopped(mut rx: watch::Receiver<bool>) -> impl Future<Output = ()> {
    async move {
        let _ = rx.wait_for(|s| *s).await;
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
    let store = Arc::new(SnapshotStore::new());
    let mut source = FileSource::new(settings.snapshot.clone());
    let _ = source.load_now(&store);

    let (stop, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let drain = Duration::from_secs(10);

    let mut proxy_addr = None;
    if let Some(p) = settings.proxy.clone() {
        let listener = bind("proxy.listen", p.listen).await?;
        proxy_addr = listener.local_addr().ok();
        let state = Arc::new(ProxyState::new(
            p,
            settings.policy.clone(),
            settings.headers.clone(),
            store.clone(),
        ));
        tasks.spawn(proxy::serve(listener, state, stopped(rx.clone()), drain));
    }
    let mut admin_addr = None;
    if let Some(addr) = settings.admin {
        let listener = bind("admin.listen", addr).await?;
        admin_addr = listener.local_addr().ok();
        tasks.spawn(crate::admin::serve(
            listener,
            store.clone(),
            stopped(rx.clone()),
        ));
    }
    tasks.spawn(source.watch(store.clone(), stopped(rx.clone())));

    tracing::info!(proxy = ?proxy_addr, admin = ?admin_addr, "keygate started");
    Ok(App {
        proxy_addr,
        admin_addr,
        store,
        stop,
        tasks,
    })
}

impl App {
    /// Stop accepting, let in-flight requests finish, and wait for every task.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
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
