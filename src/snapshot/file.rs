//! The `file` snapshot source: load at start, then reload whenever the file changes.
//!
//! Changes are seen through inotify on the file's *directory* (so an atomic rename over the file
//! and a Kubernetes Secret's `..data` symlink swap both fire), with a stat-based poll as fallback
//! and safety net. A reload is attempted only when the file's identity (inode, size, mtime) has
//! changed; a document that does not parse — a half-written file, say — is rejected and the
//! snapshot in force stays, and the next change is tried again.
//!
//! The file is parsed as it is read ([`parse_reader`]): a reload holds the snapshot in force,
//! the one being built and a block of the file, never the whole document (for a million keys
//! the document is twice the size of the snapshot). Only a sync hub, which keeps the document's
//! entries for its followers, reads the file whole.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::parse::{parse_reader, ReadError};
use super::{DocumentError, LoadFailure, PublishError, Snapshot, SnapshotStore, SourceStats};
use crate::config::SnapshotSettings;

/// Why a load did not put a snapshot in force.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("snapshot: {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("snapshot: {path}: {source}")]
    Document { path: String, source: DocumentError },
    #[error("snapshot: {path}: {source}")]
    Publish { path: String, source: PublishError },
}

/// Read and parse the file (no publishing), a block at a time. With `base`, the snapshot in
/// force, the keys that did not change are shared with it.
pub fn read(
    path: &Path,
    pepper: Option<Arc<[u8]>>,
    base: Option<&Snapshot>,
) -> Result<Snapshot, LoadError> {
    let shown = || path.display().to_string();
    let read_error = |source| LoadError::Read {
        path: shown(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let before = FileState::of(&file).map_err(read_error)?;
    let parsed = parse_reader(&file, pepper, base, before.len).map_err(|e| match e {
        ReadError::Io(source) => LoadError::Read {
            path: shown(),
            source,
        },
        ReadError::Document(source) => LoadError::Document {
            path: shown(),
            source,
        },
    });
    // A file rewritten in place while it was read (it takes a second or two at a million keys)
    // may read as the old start spliced to the new end: valid JSON, and wrong. Refused; the
    // write that changed it wakes the watcher, which reads it again.
    unchanged_since(&file, &before).map_err(read_error)?;
    parsed
}

/// What shows that an open file was written to: its length and modification time, from the
/// open descriptor. (Not its status-change time: a file renamed over the path changes only
/// that, as the old one is unlinked, and what was read of the old one is whole.)
#[derive(Debug, PartialEq, Eq)]
struct FileState {
    len: u64,
    modified: (i64, i64),
}

impl FileState {
    fn of(file: &std::fs::File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(FileState {
            len: m.len(),
            modified: (m.mtime(), m.mtime_nsec()),
        })
    }
}

fn unchanged_since(file: &std::fs::File, before: &FileState) -> std::io::Result<()> {
    if FileState::of(file)? == *before {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "the file changed while it was read (written in place); it is read again once written",
        ))
    }
}

/// The file's bytes, refused if it changed while being read.
fn read_whole(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let before = FileState::of(&file)?;
    let mut bytes = Vec::with_capacity(before.len as usize);
    file.read_to_end(&mut bytes)?;
    unchanged_since(&file, &before)?;
    Ok(bytes)
}

/// Read, parse and publish; logs the outcome (never key material).
pub fn load_into(store: &SnapshotStore, settings: &SnapshotSettings) -> Result<u64, LoadError> {
    let path = &settings.path;
    let shown = || path.display().to_string();
    let published = if store.retains_documents() {
        // A hub keeps the document's entries too: it reads the file whole.
        read_whole(path)
            .map_err(|source| LoadError::Read {
                path: shown(),
                source,
            })
            .and_then(|bytes| {
                store
                    .publish_json(&bytes, settings.pepper.clone())
                    .map_err(|e| match e {
                        LoadFailure::Document(source) => LoadError::Document {
                            path: shown(),
                            source,
                        },
                        LoadFailure::Publish(source) => LoadError::Publish {
                            path: shown(),
                            source,
                        },
                    })
            })
    } else {
        let base = store.current_arc();
        let read = read(path, settings.pepper.clone(), base.as_deref());
        drop(base);
        read.and_then(|snapshot| {
            let revision = snapshot.revision;
            store
                .publish(snapshot)
                .map(|fresh| (revision, fresh))
                .map_err(|source| LoadError::Publish {
                    path: shown(),
                    source,
                })
        })
    };
    let result = published.map(|(revision, fresh)| {
        for q in fresh {
            tracing::warn!(entry = %q.entry, reason = %q.reason, "snapshot entry quarantined");
        }
        if let Some(s) = store.current().as_ref() {
            tracing::info!(
                revision,
                keys = s.key_count(),
                quarantined = s.quarantined.len(),
                "snapshot in force"
            );
        }
        revision
    });
    if let Err(e) = &result {
        let in_force = store.current().as_ref().map(|s| s.revision);
        tracing::error!(error = %e, revision_in_force = ?in_force, "snapshot rejected; keeping the one in force");
    }
    result
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some(Fingerprint {
        ino,
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// The file source: remembers which version of the file it read last.
pub struct FileSource {
    settings: SnapshotSettings,
    last: Option<Fingerprint>,
}

impl FileSource {
    pub fn new(settings: SnapshotSettings) -> Self {
        Self {
            settings,
            last: None,
        }
    }

    /// Load the file now (at start-up). The fingerprint is taken before reading, so a change
    /// racing with this read is seen again by [`FileSource::watch`].
    pub fn load_now(&mut self, store: &SnapshotStore) -> Result<u64, LoadError> {
        self.last = fingerprint(&self.settings.path);
        let loaded = load_into(store, &self.settings);
        match &loaded {
            Ok(_) => store.confirm(),
            Err(e) => {
                count_failure(store, e);
                self.last = remembered(self.last, e);
            }
        }
        loaded
    }

    /// Follow the file until `shutdown` resolves, reloading on every change.
    pub async fn watch(self, store: Arc<SnapshotStore>, shutdown: impl Future<Output = ()>) {
        watch(self.settings, self.last, store, shutdown).await
    }
}

async fn watch(
    settings: SnapshotSettings,
    mut last: Option<Fingerprint>,
    store: Arc<SnapshotStore>,
    shutdown: impl Future<Output = ()>,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let _watcher = start_inotify(&settings.path, tx);
    let mut poll = tokio::time::interval(settings.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    // Whether the file as it is now (`last`) is the document in force. The file confirms the
    // snapshot only then: a deleted file, or one keygate refused, does not.
    let mut in_force = store.current().is_some();
    // After read errors: when the polls may try again, and the wait after that. A file event
    // (the chmod that fixes it) tries at once; polls back off to one try in 30 s, so a file
    // that stays unreadable is not an error logged every second.
    let mut unreadable: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let polled = tokio::select! {
            _ = &mut shutdown => return,
            Some(()) = rx.recv() => {
                // Let a burst of events (write, chmod, rename) settle before reading.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while rx.try_recv().is_ok() {}
                false
            }
            _ = poll.tick() => true,
        };
        let now = fingerprint(&settings.path);
        if now.is_none() {
            continue;
        }
        if polled && unreadable.is_some_and(|(next, _)| tokio::time::Instant::now() < next) {
            continue;
        }
        if now == last {
            if in_force {
                store.confirm();
            }
            continue;
        }
        last = now;
        let store2 = store.clone();
        let settings2 = settings.clone();
        // Parsing a large document is CPU work: keep it off the request threads' queues.
        let loaded = tokio::task::spawn_blocking(move || load_into(&store2, &settings2)).await;
        in_force = matches!(loaded, Ok(Ok(_)));
        match &loaded {
            Ok(Ok(_)) => store.confirm(),
            Ok(Err(e)) => {
                count_failure(&store, e);
                last = remembered(now, e);
            }
            Err(_) => SourceStats::count(&store.stats.reloads_rejected),
        }
        unreadable = match &loaded {
            Ok(Err(LoadError::Read { .. })) => {
                let wait = unreadable.map_or(settings.poll_interval, |(_, w)| {
                    (w * 2).min(Duration::from_secs(30))
                });
                Some((tokio::time::Instant::now() + wait, wait))
            }
            _ => None,
        };
    }
}

/// The version of the file to take as read after a failed load: none when it could not be read
/// (too many open files, a permission fixed later: the file need not change to become readable,
/// so every tick tries again), else the version keygate refused (read again once it changes).
fn remembered(now: Option<Fingerprint>, e: &LoadError) -> Option<Fingerprint> {
    match e {
        LoadError::Read { .. } => None,
        LoadError::Document { .. } | LoadError::Publish { .. } => now,
    }
}

/// Count a load that brought no snapshot: a file that could not be read as a fetch error, a
/// document keygate refused as a rejected reload.
fn count_failure(store: &SnapshotStore, e: &LoadError) {
    SourceStats::count(match e {
        LoadError::Read { .. } => &store.stats.fetch_errors,
        LoadError::Document { .. } | LoadError::Publish { .. } => &store.stats.reloads_rejected,
    });
}

/// inotify on the directory; `None` (polling only) when it cannot be set up.
fn start_inotify(path: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let dir: PathBuf = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_owned());
    let handler = move |event: notify::Result<notify::Event>| {
        // Only events that can change what the path resolves to: the file itself (written, or
        // renamed over), or a `..`-named entry (a Kubernetes Secret's `..data` symlink swap).
        // Other files in a busy directory must not wake the reloader.
        let relevant = event.is_ok_and(|e| {
            e.paths.is_empty()
                || e.paths.iter().any(|p| {
                    p.file_name().is_some_and(|n| {
                        Some(n) == name.as_deref() || n.as_encoded_bytes().starts_with(b"..")
                    })
                })
        });
        if relevant {
            // A full channel already means "look again": dropping the extra signal is fine.
            let _ = tx.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; polling the snapshot file");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the snapshot directory; polling");
        return None;
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_written_in_place_while_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(&path, b"{\"revision\":1}").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let before = FileState::of(&file).unwrap();
        assert!(unchanged_since(&file, &before).is_ok());
        // Another writer rewrites it in place as the read goes on (a little later: file times
        // move with the kernel's coarse clock).
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut writer = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        writer.write_all(b"{\"revision\":2}").unwrap();
        writer.flush().unwrap();
        drop(writer);
        assert!(unchanged_since(&file, &before).is_err());
        // Renamed over instead: the open file is the old one, whole, and its read stands.
        let file = std::fs::File::open(&path).unwrap();
        let before = FileState::of(&file).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let next = dir.path().join("next.json");
        std::fs::write(&next, b"{\"revision\":3}").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert!(unchanged_since(&file, &before).is_ok());
    }
}
