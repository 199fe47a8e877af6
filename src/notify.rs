//! Telling the service manager how the server is doing, by systemd's
//! `sd_notify` protocol: ready once the listeners are bound and the
//! signatures loaded, so that `systemctl start` (and units ordered after
//! this one) wait for a server that answers; stopping once shutdown
//! begins; reloading from a SIGHUP until the new signatures are loaded
//! (which `Type=notify-reload` waits for); a status line for
//! `systemctl status`; and, under `WatchdogSec=`, `WATCHDOG=1` at half
//! the watchdog's interval while the server can scan.
//!
//! The watchdog is fed from a task of the runtime, and only while some
//! scan thread is not stuck (see `engine::stuck`): a runtime that no
//! longer runs its tasks, or a server whose every scan thread is stuck,
//! stops feeding it, and systemd kills the server (SIGABRT by default, so
//! that a core dump shows where the threads hung) and, with `Restart=`,
//! starts it again. Neither can be mended from inside.
//!
//! A message is one datagram of newline-separated `KEY=value` assignments,
//! sent to the Unix socket that `NOTIFY_SOCKET` names (a path, or an
//! abstract name after `@`). Without that variable (the server was not
//! started by systemd with `Type=notify`) nothing is sent. A message that
//! cannot be sent is logged and otherwise ignored: the server serves
//! whether its manager hears it or not, and a manager that waits in vain
//! for readiness says so itself.

use std::{io, os::unix::net::UnixDatagram, path::Path, sync::Arc, time::Duration};

use crate::{proto::SvmReason, status::Svm};

/// Sends `message` to the service manager, if there is one.
pub fn notify(message: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(err) = send(Path::new(&socket), message) {
        tracing::warn!(
            socket = %Path::new(&socket).display(),
            "cannot tell the service manager `{}`: {err}",
            message.replace('\n', " ")
        );
    }
}

/// Tells the service manager that a reload began; `READY=1` says when it
/// is over. The manager wants the time the reload began, on the monotonic
/// clock, to tell this message from an earlier one.
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reading the signatures, the TLS files and the admin token again"
    ));
}

/// The interval of systemd's watchdog for this process (`WatchdogSec=`,
/// passed as `WATCHDOG_USEC`), if it has one.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    // Set when the watchdog is meant for one process of several.
    let ours = match std::env::var("WATCHDOG_PID") {
        Ok(pid) => pid.parse::<u32>().ok()? == std::process::id(),
        Err(_) => true,
    };
    (ours && usec > 0).then(|| Duration::from_micros(usec))
}

/// Feeds the watchdog of `interval` at half of it, for as long as the
/// runtime runs (shutdown, whose last saves may take a while, included),
/// except while every scan thread of `svm` is stuck.
pub async fn feed_watchdog(svm: Arc<Svm>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval / 2);
    // After a stall, one message, not the ticks missed.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut starving = false;
    loop {
        ticks.tick().await;
        let stuck = svm
            .status()
            .reasons
            .contains(&SvmReason::AllScanThreadsStuck);
        if !stuck {
            notify("WATCHDOG=1");
        } else if !starving {
            tracing::error!(
                "every scan thread is stuck: the service manager's watchdog is no longer fed, and will stop the server"
            );
        }
        starving = stuck;
    }
}

/// Sends `message` to the manager at `socket`, without waiting: a manager
/// that does not take its messages (its queue full) must not hold up the
/// thread that tells it, which may be a runtime thread.
fn send(socket: &Path, message: &str) -> io::Result<()> {
    let datagram = UnixDatagram::unbound()?;
    datagram.set_nonblocking(true)?;
    match socket.to_str().and_then(|name| name.strip_prefix('@')) {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            datagram.send_to_addr(message.as_bytes(), &address)?;
        }
        _ => {
            datagram.send_to(message.as_bytes(), socket)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_socket_by_path_or_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        send(&path, "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0; 64];
        let len = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("scanserver-test-{}", std::process::id());
            let address = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
            let manager = UnixDatagram::bind_addr(&address).unwrap();
            send(Path::new(&format!("@{name}")), "STOPPING=1").unwrap();
            let len = manager.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"STOPPING=1");
        }
        assert!(send(&dir.path().join("absent"), "READY=1").is_err());
    }
}
