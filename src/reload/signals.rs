//! What wakes the reloader: file watches (on the files' directories, so a file renamed over one
//! is seen), SIGHUP, and the switches that stop tasks; and the text hash that tells a changed
//! file from a touched one.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use tokio::sync::{mpsc, watch};

/// Resolves once `rx` reads true (or its sender is gone).
pub async fn until_set(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Resolves once either switch is set: a listener stops on shutdown or when a reload drops it.
pub async fn until_either(a: watch::Receiver<bool>, b: watch::Receiver<bool>) {
    tokio::select! {
        _ = until_set(a) => {}
        _ = until_set(b) => {}
    }
}

/// A short stable hash of config text.
pub fn text_hash(text: &str) -> String {
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}", h.finish())
}

pub(super) use crate::clock::unix_now;

/// Watches the directories of `paths` (so a file renamed over one is seen) and signals `tx` on
/// any event that names one of the files.
pub(super) fn watch_files(paths: &[PathBuf], tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let names: Vec<std::ffi::OsString> = paths.iter().filter_map(|p| p.file_name().map(|f| f.to_os_string())).collect();
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let handler = move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev.kind.is_access() {
                return;
            }
            if ev.paths.iter().any(|p| p.file_name().is_some_and(|f| names.iter().any(|n| n == f))) {
                let _ = tx.send(());
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files for changes; reload with SIGHUP or POST /api/reload");
            return None;
        }
    };
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch a directory for changes");
            return None;
        }
    }
    Some(watcher)
}

#[cfg(unix)]
pub(super) type Hup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub(super) type Hup = Option<()>;

pub(super) fn sighup() -> Hup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

pub(super) async fn recv_signal(hup: &mut Hup) -> Option<()> {
    match hup {
        #[cfg(unix)]
        Some(s) => s.recv().await,
        _ => std::future::pending().await,
    }
}
