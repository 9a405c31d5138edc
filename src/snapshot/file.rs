//! The `file` snapshot source: load at start, then reload whenever the file changes.
//!
//! Changes are seen through inotify on the file's *directory* (so an atomic rename over the file
//! and a Kubernetes Secret's `..data` symlink swap both fire), with a stat-based poll as fallback
//! and safety net. On Linux the inotify descriptor is read by the runtime itself, not by a
//! watcher thread: a keygate serving with one worker is then a single-threaded process, whose
//! socket calls the kernel and libc make without the reference counts and cancellation switches
//! a second thread costs every call (BENCHMARKS.md §2). Elsewhere the `notify` crate watches.
//! A reload is attempted only when the file's identity (inode, size, mtime) has changed; a document that does not parse — a half-written file, say — is rejected and the
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
    let file = open_regular(path).map_err(read_error)?;
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
    let mut file = open_regular(path)?;
    let before = FileState::of(&file)?;
    let mut bytes = Vec::with_capacity(before.len as usize);
    file.read_to_end(&mut bytes)?;
    unchanged_since(&file, &before)?;
    Ok(bytes)
}

/// Open `path` (symlinks followed) for reading if it is a regular file. Anything else at the
/// snapshot's path would hang the reload, and with it shutdown: a FIFO's open waits for a
/// writer, and `/dev/zero` never ends. (`O_NONBLOCK`, so that a FIFO's open returns; a regular
/// file reads the same with it.)
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    }
    let file = options.open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, a device or a directory)",
        ));
    }
    Ok(file)
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
    let _watcher = watch_directory(&settings.path, Watched::Snapshot, tx.clone());
    let mut target = TargetWatch::default();
    target.follow(&settings.path, &tx);
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
        target.follow(&settings.path, &tx);
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

/// The directory holding `path`, and the name `path` has in it.
fn directory_and_name(path: &Path) -> (PathBuf, Option<std::ffi::OsString>) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    (dir, path.file_name().map(|n| n.to_owned()))
}

/// Whether a change to the directory entry `entry` can change what the snapshot's path
/// resolves to: the file itself (written, or renamed over), or a `..`-named entry (a Kubernetes
/// Secret's `..data` symlink swap). Other files in a busy directory must not wake the reloader.
fn is_relevant(entry: &std::ffi::OsStr, name: Option<&std::ffi::OsStr>) -> bool {
    Some(entry) == name || entry.as_encoded_bytes().starts_with(b"..")
}

/// Which directory a watch is for, and so what its failure leaves: the warnings say which.
#[derive(Clone, Copy)]
enum Watched {
    /// The snapshot path's own directory: without its watch, only the poll sees a change.
    Snapshot,
    /// Where the snapshot's symlink points, outside the path's directory ([`TargetWatch`]):
    /// the path's own directory is still watched.
    LinkTarget,
}

impl Watched {
    fn fallback(self) -> &'static str {
        match self {
            Watched::Snapshot => "polling the snapshot file",
            Watched::LinkTarget => {
                "changes made where the snapshot's symlink points wait for the poll (the \
                 link's own directory is still watched)"
            }
        }
    }
}

/// What [`watch_directory`] returns: the watch lasts as long as it lives.
#[cfg(target_os = "linux")]
type Watch = DirectoryWatch;
#[cfg(not(target_os = "linux"))]
type Watch = notify::RecommendedWatcher;

/// A snapshot path that is a symlink into another directory (a mounted volume, a shared config
/// directory): changes there leave the path's own directory untouched (`keygate keys` writes
/// beside the file the link resolves to), so that directory is watched too, and the watch moves
/// when the link is pointed elsewhere. Without it such edits waited for the poll.
///
/// The link is read one level, not resolved to the end: `/srv/current/keys.json` stays that, so
/// the directory's own watch follows `current` when it is swapped, and a Kubernetes volume's
/// `..data/keys.json` (beside the link, swapped at each update) needs no watch of its own.
#[derive(Default)]
struct TargetWatch {
    /// What the link pointed at when last looked at (joined to the link's directory).
    target: Option<PathBuf>,
    watch: Option<Watch>,
}

impl TargetWatch {
    /// Look at what `path` points at now; watch its directory if that is not the path's own
    /// (already watched), and stop watching the one it no longer names.
    fn follow(&mut self, path: &Path, tx: &mpsc::Sender<()>) {
        let (own, _) = directory_and_name(path);
        let target = std::fs::read_link(path).ok().map(|t| own.join(t));
        if target == self.target {
            return;
        }
        self.watch = None;
        self.watch = target
            .as_deref()
            .filter(|t| !beside(&own, t))
            .and_then(|t| watch_directory(t, Watched::LinkTarget, tx.clone()));
        self.target = target;
    }
}

/// Whether `target` is in `own`, or in a `..`-named directory there (a Kubernetes volume's
/// `..data`), whose changes `own`'s watch sees already.
fn beside(own: &Path, target: &Path) -> bool {
    let (dir, _) = directory_and_name(target);
    dir == own
        || (dir.parent() == Some(own)
            && dir
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"..")))
}

/// Watches the directory while it lives (the watch ends when it is dropped).
#[cfg(target_os = "linux")]
struct DirectoryWatch(tokio::task::JoinHandle<()>);

#[cfg(target_os = "linux")]
impl Drop for DirectoryWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// inotify on the directory, read by a task on the runtime; `None` (polling only) when it
/// cannot be set up. The directory's own parent is watched too, for the entry that names the
/// directory: a release layout's `current` symlink swapped to another directory (inotify
/// watches the directory a path resolved to when the watch was added), or the directory
/// removed and made again. Either re-arms the directory's watch on what its path names now.
#[cfg(target_os = "linux")]
fn watch_directory(
    path: &Path,
    watched_as: Watched,
    tx: mpsc::Sender<()>,
) -> Option<DirectoryWatch> {
    use inotify::{EventMask, Inotify, WatchMask};

    let (dir, name) = directory_and_name(path);
    let inotify = match Inotify::init() {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; {}", watched_as.fallback());
            return None;
        }
    };
    // What can replace, rewrite or remove an entry, and the directory's own end.
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    let mut watches = inotify.watches();
    let mut watched = match watches.add(&dir, mask) {
        Ok(wd) => Some(wd),
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the directory; {}", watched_as.fallback());
            return None;
        }
    };
    // The entry naming the directory in its parent (none for `/`, or a path ending in `..`).
    let mut above = match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(entry)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            let entry_mask =
                WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_FROM | WatchMask::MOVED_TO;
            match watches.add(parent, entry_mask) {
                Ok(wd) => Some((wd, entry.to_owned())),
                // The directory's own watch still serves; only a swap of it goes unseen.
                Err(e) => {
                    tracing::debug!(error = %e, "cannot watch the snapshot directory's parent");
                    None
                }
            }
        }
        _ => None,
    };
    // Read as the runtime finds the descriptor readable (inotify's stream, on tokio's reactor).
    let mut events = match inotify.into_event_stream([0u8; 4096]) {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(error = %e, "inotify not pollable; {}", watched_as.fallback());
            return None;
        }
    };
    let task = tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, "reading inotify failed; {}", watched_as.fallback());
                    return;
                }
            };
            let ended = |what: &str| {
                tracing::warn!(dir = %dir.display(), "the {what} is no longer watched; {}", watched_as.fallback());
                let _ = tx.try_send(());
            };
            let parent_event = above.as_ref().filter(|(wd, _)| event.wd == *wd);
            let relevant = if event.mask.contains(EventMask::Q_OVERFLOW) {
                // Events were lost: look again.
                true
            } else if let Some((_, entry)) = parent_event {
                if event.mask.contains(EventMask::IGNORED) {
                    // The parent went: the directory's entry is not watched any more.
                    above = None;
                    if watched.is_none() {
                        return ended("directory");
                    }
                    false
                } else if event.name.as_deref() == Some(entry.as_os_str()) {
                    // The directory's entry changed: watch what the path names now (the same
                    // inode gives the same watch; another one a new watch, and the old goes).
                    match watches.add(&dir, mask) {
                        Ok(wd) => {
                            if let Some(old) = watched.replace(wd.clone()).filter(|o| *o != wd) {
                                let _ = watches.remove(old);
                            }
                        }
                        // Gone for now (removed, or a symlink to nowhere): made again later.
                        Err(_) => watched = None,
                    }
                    true
                } else {
                    false
                }
            } else if Some(&event.wd) != watched.as_ref() {
                // The last events of a directory the path no longer names.
                false
            } else if event.mask.contains(EventMask::IGNORED) {
                // The directory's watch is gone (removed or unmounted): what a look finds is the
                // last it says. Its parent's watch makes it again; without one, polling goes on
                // alone.
                watched = None;
                if above.is_none() {
                    return ended("directory");
                }
                true
            } else {
                // The directory itself moved or going, or the entry that is the file.
                event
                    .mask
                    .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                    || event
                        .name
                        .is_some_and(|entry| is_relevant(&entry, name.as_deref()))
            };
            // A full channel already means "look again": dropping the extra signal is fine.
            if relevant && tx.try_send(()).is_err() && tx.is_closed() {
                return;
            }
        }
    });
    Some(DirectoryWatch(task))
}

/// inotify (or the platform's watch) on the directory through `notify`, on a thread of its own;
/// `None` (polling only) when it cannot be set up.
#[cfg(not(target_os = "linux"))]
fn watch_directory(
    path: &Path,
    watched_as: Watched,
    tx: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};

    let (dir, name) = directory_and_name(path);
    let handler = move |event: notify::Result<notify::Event>| {
        let relevant = event.is_ok_and(|e| {
            e.paths.is_empty()
                || e.paths.iter().any(|p| {
                    p.file_name()
                        .is_some_and(|entry| is_relevant(entry, name.as_deref()))
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
            tracing::warn!(error = %e, "file watching unavailable; {}", watched_as.fallback());
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the directory; {}", watched_as.fallback());
        return None;
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A link's target needs a watch of its own only outside the link's directory and its
    /// `..`-named directories (a Kubernetes volume's `..data`, swapped beside the link).
    #[test]
    fn a_target_beside_the_link_needs_no_watch_of_its_own() {
        let own = Path::new("/etc/keygate/snapshot");
        for (target, is_beside) in [
            ("/etc/keygate/snapshot/keys.v2.json", true),
            ("/etc/keygate/snapshot/..data/keys.json", true),
            ("/etc/keygate/snapshot/..2026_12_05/keys.json", true),
            ("/etc/keygate/snapshot/releases/keys.json", false),
            ("/srv/keys/keys.json", false),
            ("/etc/keygate/keys.json", false),
        ] {
            assert_eq!(beside(own, Path::new(target)), is_beside, "{target}");
        }
        assert!(beside(
            Path::new("."),
            &Path::new(".").join("..data/keys.json")
        ));
    }

    /// A snapshot file in a directory of its own, and the directory's watch with its signals.
    #[cfg(target_os = "linux")]
    fn watched() -> (
        tempfile::TempDir,
        PathBuf,
        mpsc::Receiver<()>,
        DirectoryWatch,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(&path, b"{}").unwrap();
        let (tx, rx) = mpsc::channel(1);
        let watch = watch_directory(&path, Watched::Snapshot, tx).expect("inotify works here");
        (dir, path, rx, watch)
    }

    /// The directory watch alone (no polling behind it): what changes the snapshot's path
    /// signals, within a deadline; what happens to other files in the directory does not.
    /// (Linux's watch; elsewhere the platform's, through notify, has its own timing.)
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_directory_watch_signals_changes_to_the_path_and_ignores_other_files() {
        let (dir, path, mut rx, watch) = watched();
        let within = Duration::from_secs(2);
        let signalled = async |rx: &mut mpsc::Receiver<()>, what: &str| {
            let got = tokio::time::timeout(within, rx.recv()).await;
            assert!(
                matches!(got, Ok(Some(()))),
                "{what}: no signal within {within:?}"
            );
            // Let the rest of the burst arrive, then start from nothing.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while rx.try_recv().is_ok() {}
        };
        let quiet = async |rx: &mut mpsc::Receiver<()>, what: &str| {
            let got = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
            assert!(got.is_err(), "{what}: signalled {got:?}");
        };

        // Another file written, created and removed: nothing.
        std::fs::write(dir.path().join("other.log"), b"x").unwrap();
        std::fs::remove_file(dir.path().join("other.log")).unwrap();
        quiet(&mut rx, "another file").await;

        // Written in place; replaced by a rename (how `keys` writes); removed; created again.
        std::fs::write(&path, b"{\"revision\":2}").unwrap();
        signalled(&mut rx, "written in place").await;
        let next = dir.path().join(".keys.json.tmp");
        std::fs::write(&next, b"{\"revision\":3}").unwrap();
        quiet(&mut rx, "the new version written beside it").await;
        std::fs::rename(&next, &path).unwrap();
        signalled(&mut rx, "renamed over").await;
        std::fs::remove_file(&path).unwrap();
        signalled(&mut rx, "removed").await;
        std::fs::write(&path, b"{}").unwrap();
        signalled(&mut rx, "created").await;

        // A Kubernetes Secret's update: a new `..data` symlink renamed over the old one.
        let data = dir.path().join("..2026_12_04");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&data, dir.path().join("..data_tmp")).unwrap();
        signalled(&mut rx, "a `..` link made").await;
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        signalled(&mut rx, "the `..data` swap").await;

        // The watch ends with its owner: the channel closes.
        drop(watch);
        let closed = tokio::time::timeout(within, rx.recv()).await;
        assert!(matches!(closed, Ok(None)), "still watching: {closed:?}");
    }

    /// A signal within two seconds, then the rest of its burst drained.
    #[cfg(target_os = "linux")]
    async fn signalled(rx: &mut mpsc::Receiver<()>, what: &str) {
        let got = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        assert!(matches!(got, Ok(Some(()))), "{what}: no signal");
        tokio::time::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
    }

    #[cfg(target_os = "linux")]
    async fn quiet(rx: &mut mpsc::Receiver<()>, what: &str) {
        let got = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(got.is_err(), "{what}: signalled {got:?}");
    }

    /// A watched directory removed: a signal (the file is gone), and once it is made again the
    /// watch follows it there (its parent's watch sees the entry come back).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_removed_directory_is_watched_again_once_made_again() {
        let (dir, path, mut rx, _watch) = watched();
        let kept = dir.path().to_owned();
        std::fs::remove_dir_all(&kept).unwrap();
        signalled(&mut rx, "the directory removed").await;
        std::fs::create_dir(&kept).unwrap();
        signalled(&mut rx, "the directory made again").await;
        std::fs::write(&path, b"{}").unwrap();
        signalled(&mut rx, "the file written in the new directory").await;
        std::fs::write(kept.join("other.log"), b"x").unwrap();
        quiet(&mut rx, "another file in the new directory").await;
    }

    /// A release layout: the path goes through a `current` symlink to a directory, and a
    /// release is made current by renaming a new symlink over it. The watch follows the swap
    /// at once (inotify watches the directory a path named when the watch was added), and the
    /// old release's changes no longer signal.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_swapped_directory_symlink_is_followed() {
        let root = tempfile::tempdir().unwrap();
        let releases = root.path().join("releases");
        for r in ["1", "2"] {
            std::fs::create_dir_all(releases.join(r)).unwrap();
            std::fs::write(releases.join(r).join("keys.json"), b"{}").unwrap();
        }
        let current = root.path().join("current");
        std::os::unix::fs::symlink(releases.join("1"), &current).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let _watch = watch_directory(&current.join("keys.json"), Watched::Snapshot, tx)
            .expect("inotify works here");

        std::fs::write(releases.join("1").join("keys.json"), b"{\"revision\":2}").unwrap();
        signalled(&mut rx, "the current release's file written").await;
        let next = root.path().join("current.tmp");
        std::os::unix::fs::symlink(releases.join("2"), &next).unwrap();
        quiet(&mut rx, "a symlink made beside it").await;
        std::fs::rename(&next, &current).unwrap();
        signalled(&mut rx, "current swapped to release 2").await;
        std::fs::write(releases.join("2").join("keys.json"), b"{\"revision\":3}").unwrap();
        signalled(&mut rx, "release 2's file written").await;
        std::fs::write(releases.join("1").join("keys.json"), b"{\"revision\":4}").unwrap();
        quiet(&mut rx, "the old release's file written").await;
    }

    /// A symlinked snapshot whose target directory cannot be watched keeps its own directory's
    /// watch: the warning says so, not that the file is now only polled.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_unwatchable_link_target_is_not_called_polling_only() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("keys.json");
        std::os::unix::fs::symlink(dir.path().join("gone/keys.json"), &link).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let mut target = TargetWatch::default();
        let logged = crate::telemetry::logged_by(|| target.follow(&link, &tx));
        assert!(
            target.watch.is_none(),
            "a missing directory cannot be watched"
        );
        assert!(
            logged.contains("cannot watch the directory")
                && logged.contains("link's own directory is still watched")
                && !logged.contains("polling the snapshot file"),
            "{logged}"
        );
    }

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
