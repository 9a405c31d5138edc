//! The last good snapshot on disk (`snapshot.cache_path`).
//!
//! After each revision a remote source (HTTP or gRPC) puts in force, its document is written
//! here atomically (temporary file, fsync, rename), off the request path. At start-up, when the
//! source cannot be reached, this file is put in force instead, so a restarted pod serves its
//! last known keys rather than refusing everything. Its modification time is when that revision
//! was last confirmed, which `snapshot.max_staleness` measures from: a cache older than the bound
//! is loaded (readiness says why) but not served.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use super::{LoadFailure, SnapshotStore};

/// Writes the cache for one source, and remembers whether the last write failed: the file then
/// holds an older revision than the one in force. Cloned into the threads that publish.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    behind: Arc<AtomicBool>,
}

impl Writer {
    /// Write `document` to `path`, replacing it atomically. Logs a failure (the snapshot in force
    /// is not affected by one).
    pub fn write(&self, path: &Path, document: &[u8]) {
        let written = crate::keys::write_atomic(path, document);
        match &written {
            Ok(()) => tracing::debug!(path = %path.display(), "snapshot cache written"),
            Err(e) => tracing::warn!(error = %e, "cannot write the snapshot cache"),
        }
        self.behind.store(written.is_err(), Ordering::Relaxed);
    }
}

/// Keeps the cache's modification time at the last confirmation, so a restart with the source
/// down measures `max_staleness` from when the source last vouched for the snapshot, not from
/// when its revision was written. Touches at most once a second, and never a cache left behind
/// by a failed write: a confirmation of the revision in force says nothing of an older one, and
/// touching it would let a restart serve it as fresh.
#[derive(Debug, Default)]
pub struct Toucher {
    last: Option<std::time::Instant>,
    writer: Writer,
}

impl Toucher {
    /// The writer whose failures stop the touching.
    pub fn writer(&self) -> Writer {
        self.writer.clone()
    }

    pub fn confirmed(&mut self, path: Option<&Path>) {
        let Some(path) = path else { return };
        if self.writer.behind.load(Ordering::Relaxed)
            || self
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
    // As any other source's document: a hub keeps its entries too, so that a hub started from
    // its cache has something to send the sidecars that follow it.
    let published = match store.publish_json(&bytes, pepper) {
        Ok((revision, _)) => Ok(revision),
        Err(LoadFailure::Document(e)) => {
            tracing::error!(path = %shown, error = %e, "the snapshot cache is not a valid document; ignoring it");
            return None;
        }
        Err(LoadFailure::Publish(e)) => Err(e),
    };
    match published {
        Ok(revision) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mtime(path: &Path) -> SystemTime {
        std::fs::metadata(path).unwrap().modified().unwrap()
    }

    /// After a failed write the cache holds an older revision than the one in force: a
    /// confirmation must not make it look fresh, or a restart with the source down would serve
    /// keys revoked since as confirmed just now. A successful write ends that.
    #[test]
    fn a_cache_left_behind_by_a_failed_write_is_not_touched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last-good.json");
        std::fs::write(&path, b"{}").unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        let make_old = || {
            std::fs::File::options()
                .append(true)
                .open(&path)
                .unwrap()
                .set_modified(old)
                .unwrap()
        };
        make_old();

        let mut toucher = Toucher::default();
        let writer = toucher.writer();
        writer.write(&dir.path().join("no-such-dir").join("x.json"), b"{}");
        toucher.confirmed(Some(&path));
        assert_eq!(mtime(&path), old, "touched after a failed write");

        writer.write(&path, b"{\"revision\":2}");
        assert!(mtime(&path) > old);
        make_old();
        toucher.confirmed(Some(&path));
        assert!(
            mtime(&path) > old,
            "a cache that holds the revision in force is touched"
        );
    }
}
