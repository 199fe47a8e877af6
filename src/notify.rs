//! Telling the service manager how the server is doing, by systemd's
//! `sd_notify` protocol: ready once the listeners are bound and the
//! signatures loaded, so that `systemctl start` (and units ordered after
//! this one) wait for a server that answers; stopping once shutdown
//! begins; reloading from a SIGHUP until the new signatures are loaded
//! (which `Type=notify-reload` waits for); and a status line for
//! `systemctl status`.
//!
//! A message is one datagram of newline-separated `KEY=value` assignments,
//! sent to the Unix socket that `NOTIFY_SOCKET` names (a path, or an
//! abstract name after `@`). Without that variable (the server was not
//! started by systemd with `Type=notify`) nothing is sent. A message that
//! cannot be sent is logged and otherwise ignored: the server serves
//! whether its manager hears it or not, and a manager that waits in vain
//! for readiness says so itself.

use std::{io, os::unix::net::UnixDatagram, path::Path};

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
        "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reading the signatures and TLS files again"
    ));
}

fn send(socket: &Path, message: &str) -> io::Result<()> {
    let datagram = UnixDatagram::unbound()?;
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
