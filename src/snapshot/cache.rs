//! The last good snapshot on disk (`snapshot.cache_path`).
//!
//! After each revision a remote source (HTTP or gRPC) puts in force, its document is written
//! here atomically (temporary file, fsync, rename), off the request path. At start-up, when the
//! source cannot be reached, this file is put in force instead, so a restarted pod serves its
//! last known keys rather than refusing everything. Its modification time is when that revision
//! was last confirmed, which `snapshot.max_staleness` measures from: a cache older than the bound
//! is loaded (readiness says why) but not served.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::{parse, SnapshotStore};

/// Write `document` to `path`, replacing it atomically. Logs a failure (the snapshot in force is
/// not affected by one).
pub fn write(path: &Path, document: &[u8]) {
    match crate::keys::write_atomic(path, document) {
        Ok(()) => tracing::debug!(path = %path.display(), "snapshot cache written"),
        Err(e) => tracing::warn!(error = %e, "cannot write the snapshot cache"),
    }
}

/// Keeps the cache's modification time at the last confirmation, so a restart with the source
/// down measures `max_staleness` from when the source last vouched for the snapshot, not from
/// when its revision was written. Touches at most once a second.
#[derive(Debug, Default)]
pub struct Toucher {
    last: Option<std::time::Instant>,
}

impl Toucher {
    pub fn confirmed(&mut self, path: Option<&Path>) {
        let Some(path) = path else { return };
        if self
            .last
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let touched = std::fs::File::options()
            .append(true)
            .open(path)
            .and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(e) = touched {
            tracing::debug!(path = %path.display(), error = %e, "cannot touch the snapshot cache");
        }
    }
}

/// Put the cached snapshot in force, confirmed as of the file's modification time. Returns its
/// revision, or `None` (logged) when there is no usable cache.
pub fn load_into(store: &SnapshotStore, path: &Path, pepper: Option<Arc<[u8]>>) -> Option<u64> {
    let shown = path.display();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %shown, "no snapshot cache to fall back on");
            return None;
        }
        Err(e) => {
            tracing::error!(path = %shown, error = %e, "cannot read the snapshot cache");
            return None;
        }
    };
    let written = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let snapshot = match parse(&bytes, pepper) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(path = %shown, error = %e, "the snapshot cache is not a valid document; ignoring it");
            return None;
        }
    };
    let revision = snapshot.revision;
    match store.publish(snapshot) {
        Ok(_) => {
            // A modification time in the future (a clock step) proves nothing: count it as old.
            let age = SystemTime::now()
                .duration_since(written)
                .unwrap_or(std::time::Duration::MAX / 4);
            store.confirm_ago(age);
            tracing::warn!(
                path = %shown, revision, age_seconds = age.as_secs(),
                "the source is unreachable: serving the cached snapshot"
            );
            Some(revision)
        }
        Err(e) => {
            tracing::info!(path = %shown, error = %e, "the snapshot cache is older than the snapshot in force");
            None
        }
    }
}
