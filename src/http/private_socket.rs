//! The directory that holds the socket between the guard and tiny_http: only this user can enter
//! it, so no other local user reaches tiny_http around the guard. A tenantd that was killed
//! (SIGKILL, the OOM killer) leaves its directory behind; the next start removes those.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use log::info;
use socket2::{Domain, SockAddr, Socket, Type};

const PREFIX: &str = "tenantd-";

/// The socket's file name inside the directory.
pub const SOCKET: &str = "http.sock";

/// Creates a fresh private directory in the temporary directory, then removes this user's
/// directories left by tenantds that are gone.
pub fn create() -> Result<PathBuf> {
    let name = format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let dir = std::env::temp_dir().join(name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    remove_stale(&dir);
    Ok(dir)
}

/// Removes the directories, owned like `ours`, whose socket nobody listens on. Whether a
/// process is alive is not asked: a tenantd in another PID namespace may share the directory.
fn remove_stale(ours: &Path) {
    let Ok(uid) = std::fs::metadata(ours).map(|m| m.uid()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let stale: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
        .filter(|e| e.metadata().is_ok_and(|m| m.is_dir() && m.uid() == uid))
        .map(|e| e.path())
        .filter(|dir| dir != ours && nobody_listens(&dir.join(SOCKET)))
        .collect();
    for dir in &stale {
        if std::fs::remove_dir_all(dir).is_ok() {
            info!("removed {}, left by a tenantd that is gone", dir.display());
        }
    }
}

/// The socket file exists and refuses connections: its listener is gone. The connect does not
/// block: a live tenantd whose backlog is full (it answers `EAGAIN`) must not hold up this start.
fn nobody_listens(socket: &Path) -> bool {
    let refused = || -> std::io::Result<bool> {
        let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        probe.set_nonblocking(true)?;
        Ok(matches!(probe.connect(&SockAddr::unix(socket)?),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused))
    };
    refused().unwrap_or(false)
}
