//! The service manager's notification protocol (`sd_notify`), written out: newline-separated
//! `KEY=value` lines in one datagram to the Unix socket named by `NOTIFY_SOCKET`, so systemd
//! knows when tenantd is ready, what it runs, that it is alive (the watchdog) and that it is
//! stopping. Without `NOTIFY_SOCKET` there is no `Notifier` and nothing is sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A send waits at most this long for room in the service manager's queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Where notifications go, and how often the service manager wants to hear that all is well.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier the service manager asked for through the environment, if any.
    pub fn from_env() -> Result<Option<Notifier>> {
        Notifier::from_lookup(|name| std::env::var(name).ok(), std::process::id())
    }

    /// Reads `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket), `WATCHDOG_USEC` and
    /// `WATCHDOG_PID` (the watchdog is this process's only when it names `pid`, or nobody).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>, pid: u32) -> Result<Option<Self>> {
        let Some(target) = lookup("NOTIFY_SOCKET").filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        let addr = match target.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None if target.starts_with('/') => SocketAddr::from_pathname(&target),
            None => bail!("NOTIFY_SOCKET={target:?} is neither a socket path nor @name"),
        }
        .with_context(|| format!("NOTIFY_SOCKET={target:?} is not a usable socket address"))?;
        let socket = UnixDatagram::unbound().context("opening a socket for NOTIFY_SOCKET")?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Some(Notifier {
            socket,
            addr,
            watchdog: watchdog_interval(&lookup, pid)?,
        }))
    }

    /// The watchdog's timeout (`WATCHDOG_USEC`) when it applies to this process: it must hear
    /// `WATCHDOG=1` more often than this.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one notification: `KEY=value` lines.
    pub fn send(&self, state: &str) -> Result<()> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .context("notifying the service manager")?;
        Ok(())
    }
}

fn watchdog_interval(
    lookup: &impl Fn(&str) -> Option<String>,
    pid: u32,
) -> Result<Option<Duration>> {
    let Some(raw) = lookup("WATCHDOG_USEC").filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let usec: u64 = raw
        .trim()
        .parse()
        .with_context(|| format!("WATCHDOG_USEC={raw:?} is not a number of microseconds"))?;
    let for_us = lookup("WATCHDOG_PID")
        .filter(|v| !v.is_empty())
        .is_none_or(|p| p.trim() == pid.to_string());
    Ok((for_us && usec > 0).then(|| Duration::from_micros(usec)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn without_notify_socket_there_is_no_notifier() {
        assert!(Notifier::from_lookup(env(&[]), 7).unwrap().is_none());
        let blank = [("NOTIFY_SOCKET", ""), ("WATCHDOG_USEC", "1000")];
        assert!(Notifier::from_lookup(env(&blank), 7).unwrap().is_none());
    }

    #[test]
    fn the_watchdog_is_ours_only_when_its_pid_is_ours_or_unnamed() {
        let vars = [
            ("NOTIFY_SOCKET", "@tenantd-test"),
            ("WATCHDOG_USEC", "3000000"),
        ];
        let n = Notifier::from_lookup(env(&vars), 7).unwrap().unwrap();
        assert_eq!(n.watchdog(), Some(Duration::from_secs(3)));
        let ours = [("WATCHDOG_PID", "7"), vars[0], vars[1]];
        let n = Notifier::from_lookup(env(&ours), 7).unwrap().unwrap();
        assert_eq!(n.watchdog(), Some(Duration::from_secs(3)));
        let theirs = [("WATCHDOG_PID", "8"), vars[0], vars[1]];
        let n = Notifier::from_lookup(env(&theirs), 7).unwrap().unwrap();
        assert_eq!(n.watchdog(), None);
    }

    #[test]
    fn a_relative_socket_or_a_bad_interval_is_refused_by_name() {
        let relative = [("NOTIFY_SOCKET", "notify.sock")];
        let err = Notifier::from_lookup(env(&relative), 7).err().unwrap();
        assert!(format!("{err:#}").contains("NOTIFY_SOCKET"), "{err:#}");
        let bad = [("NOTIFY_SOCKET", "@x"), ("WATCHDOG_USEC", "soon")];
        let err = Notifier::from_lookup(env(&bad), 7).err().unwrap();
        assert!(format!("{err:#}").contains("WATCHDOG_USEC"), "{err:#}");
    }

    #[test]
    fn a_notification_arrives_as_one_datagram_at_a_path_or_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("tenantd-notify-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("notify.sock");
        let by_path = UnixDatagram::bind(&path).unwrap();
        let name = format!("tenantd-notify-{}", uuid::Uuid::new_v4().simple());
        let by_name =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        for (target, socket) in [
            (path.display().to_string(), by_path),
            (format!("@{name}"), by_name),
        ] {
            let vars = [("NOTIFY_SOCKET", target.as_str())];
            let n = Notifier::from_lookup(env(&vars), 7).unwrap().unwrap();
            n.send("READY=1\nSTATUS=serving").unwrap();
            let mut buf = [0; 64];
            let len = socket.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving", "{target}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
