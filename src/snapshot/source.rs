//! Choosing, starting and running the snapshot source the configuration names.
//!
//! Start-up tries the source once, inline, so that a reachable source is in force before any
//! listener answers. When a remote source (HTTP or gRPC) cannot be reached and
//! `snapshot.cache_path` holds a last good snapshot, that one is put in force instead; the
//! source keeps being retried in the background and replaces it when it answers.

use std::future::Future;
use std::sync::Arc;

use super::file::FileSource;
use super::http_source::HttpSource;
use super::SnapshotStore;
use crate::config::{SnapshotSettings, SourceKind};
use crate::sync::client::SyncClient;

/// How long the first HTTP poll may wait for an answer before start-up goes on without it.
const FIRST_READ: std::time::Duration = std::time::Duration::from_secs(5);

/// A started source, ready to follow changes.
pub enum Source {
    File(Box<FileSource>),
    Http(Box<HttpSource>),
    Grpc(Box<SyncClient>),
}

/// Why the source could not even be set up (not: why it could not be reached).
#[derive(Debug, thiserror::Error)]
#[error("snapshot source: {0}")]
pub struct SourceError(String);

impl Source {
    /// Set the source up and make the first attempt to load from it (falling back on the
    /// cache). A source that cannot be reached is not an error: the fronts answer
    /// `snapshot_unavailable` until one arrives.
    pub async fn start(
        settings: &SnapshotSettings,
        store: &Arc<SnapshotStore>,
    ) -> Result<Self, SourceError> {
        let source = match settings.source {
            SourceKind::File => {
                let mut file = FileSource::new(settings.clone());
                let _ = file.load_now(store);
                return Ok(Self::File(Box::new(file)));
            }
            SourceKind::Http => {
                let mut http = HttpSource::new(settings.clone()).map_err(SourceError)?;
                // Bounded, so a slow control plane cannot hold the listeners (and the
                // probes) back for long; the background loop keeps trying.
                let first = settings.connect_timeout + settings.read_timeout.min(FIRST_READ);
                let reached = matches!(
                    tokio::time::timeout(first, http.poll_once(store)).await,
                    Ok(Ok(_))
                );
                if reached {
                    return Ok(Self::Http(Box::new(http)));
                }
                Self::Http(Box::new(http))
            }
            SourceKind::Grpc => {
                let mut client = SyncClient::new(settings.clone()).map_err(SourceError)?;
                if let Some(path) = &settings.cache_path {
                    client.resume_from_cache(store, path);
                }
                let reached = client.first_snapshot(store).await;
                if reached {
                    return Ok(Self::Grpc(Box::new(client)));
                }
                Self::Grpc(Box::new(client))
            }
        };
        if store.current().is_none() {
            if let Some(path) = &settings.cache_path {
                super::cache::load_into(store, path, settings.pepper.clone());
            }
        }
        Ok(source)
    }

    /// Follow the source until `shutdown` resolves.
    pub async fn run(self, store: Arc<SnapshotStore>, shutdown: impl Future<Output = ()>) {
        match self {
            Self::File(f) => f.watch(store, shutdown).await,
            Self::Http(h) => h.run(store, shutdown).await,
            Self::Grpc(g) => g.run(store, shutdown).await,
        }
    }
}
