//! What asks for a reload: saves of servers.yaml (debounced) and SIGHUP, both turned into commands on the
//! supervisor's command channel; `pomelo-rs reload` and `POST /api/reload` send [`Command::Reload`] themselves.
//!
//! One task ([`spawn`], on the master's task tracker) owns the file watcher and the SIGHUP stream and ends
//! when its token is cancelled, dropping the watcher. A file event only sends [`Command::ReloadIfChanged`]:
//! opens and reads are not events here, and the supervisor compares the content with the last it read,
//! so `cat servers.yaml` or `pomelo-rs list` never reloads. SIGHUP forces a reload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::command::{Command, Reply, UNCHANGED};

/// One save (editors write, rename and chmod) within this long gives one event.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Whether an event can change the file's content: anything but an open, a read or a close after reading.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Sends a unit on `tx` whenever `file` may have been written, created, renamed into place or removed,
/// debounced. Watches the directory, because an editor that saves by rename replaces the file the watch
/// was on. Returns the watcher; drop it to stop.
pub fn watch(file: &Path, tx: mpsc::Sender<()>) -> notify::Result<impl Drop> {
    use notify::RecursiveMode;
    use notify_debouncer_full::{new_debouncer, DebounceEventResult};
    let file: PathBuf = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let name = file.file_name().map(|n| n.to_os_string());
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let touched = events.iter().any(|e| {
            may_change_content(&e.kind) && e.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name)
        });
        if touched {
            // A reload is already queued if this fails: one is enough.
            let _ = tx.try_send(());
        }
    })?;
    debouncer.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(debouncer)
}

/// Starts the trigger task: events of servers.yaml become [`Command::ReloadIfChanged`], SIGHUP and saves of
/// the `others` it names (the protobuf files, as Pomelo watched them) [`Command::Reload`]: the supervisor
/// only compares servers.yaml's text, and a reload whose servers did not change restarts nothing.
pub fn spawn(
    file: &Path,
    others: &[PathBuf],
    commands: mpsc::Sender<(Command, Reply)>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let (dep_tx, mut dep_rx) = mpsc::channel::<()>(1);
    let mut watchers = Vec::new();
    for (f, tx) in std::iter::once((file, tx)).chain(others.iter().map(|o| (o.as_path(), dep_tx.clone()))) {
        match watch(f, tx) {
            Ok(w) => watchers.push(w),
            Err(e) => {
                tracing::warn!("cannot watch {} for changes ({e}); use `pomelo-rs reload` or SIGHUP", f.display())
            }
        }
    }
    drop(dep_tx);
    tasks.spawn(async move {
        let _watchers = watchers;
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP ({e}); use `pomelo-rs reload`");
                None
            }
        };
        loop {
            let cmd = tokio::select! {
                _ = stop.cancelled() => return,
                Some(()) = rx.recv() => Command::ReloadIfChanged,
                Some(()) = dep_rx.recv() => {
                    tracing::info!("a protobuf file changed: reloading");
                    Command::Reload
                }
                Some(()) = async { hup.as_mut()?.recv().await } => {
                    tracing::info!("SIGHUP: reloading");
                    Command::Reload
                }
            };
            let (reply, answer) = oneshot::channel();
            if commands.send((cmd, reply)).await.is_err() {
                return;
            }
            match answer.await {
                Ok(Ok(summary)) if summary == UNCHANGED => tracing::debug!("{summary}"),
                Ok(Ok(summary)) => tracing::info!("reloaded: {summary}"),
                Ok(Err(e)) => tracing::error!("{e}"),
                Err(_) => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_save_by_rename_is_seen_once_and_reads_are_not_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("servers.yaml");
        std::fs::write(&file, "a").expect("write");
        let (tx, mut rx) = mpsc::channel(1);
        let _w = watch(&file, tx).expect("watch");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let tmp = dir.path().join(".servers.yaml.swp");
        std::fs::write(&tmp, "b").expect("write tmp");
        std::fs::rename(&tmp, &file).expect("rename");
        tokio::time::timeout(Duration::from_secs(3), rx.recv()).await.expect("seen").expect("open");
        // Another file in the directory is not a reload.
        std::fs::write(dir.path().join("other.txt"), "x").expect("write");
        assert!(tokio::time::timeout(Duration::from_millis(800), rx.recv()).await.is_err());
        // Nor is reading the file.
        for _ in 0..3 {
            assert_eq!(std::fs::read_to_string(&file).expect("read"), "b");
        }
        assert!(tokio::time::timeout(Duration::from_millis(800), rx.recv()).await.is_err(), "a read is no event");
        // A write in place is.
        std::fs::write(&file, "c").expect("write");
        tokio::time::timeout(Duration::from_secs(3), rx.recv()).await.expect("seen").expect("open");
    }
}
