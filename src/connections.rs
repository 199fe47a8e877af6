//! The agent listener's connections: at most `server.max_connections` open
//! at once, and a process allowed to open that many files.
//!
//! Sessions are bounded by `server.max_agents`, but a connection costs the
//! server before any session: a file descriptor, HTTP/2 state, and up to a
//! flow-control window (4 MiB) of content buffered while its reader is
//! held back. Without a bound of their own, connections that never open a
//! session (a scanner of the network, a client that leaks channels) could
//! take every descriptor the process has, after which no agent, new or
//! reconnecting, would get in. A connection beyond the limit is closed as
//! soon as it is accepted, before its TLS handshake: its agent sees the
//! SVM unavailable and may pick another, and the log says once per burst
//! that the limit was reached. A place is taken at accept and given back
//! when the connection closes, whichever way.
//!
//! The default, twice `max_agents`, leaves every agent room to reconnect
//! while its old connection is still being closed (a dead peer's within
//! 30 s, see `server`), and tools (health checks, `lightagent`) room
//! beside them.
//!
//! Linux starts most processes with a soft limit of 1,024 open files,
//! fewer than the default limits need. [`raise_open_files`] raises the
//! soft limit as far as the hard one allows, as servers written in Go do
//! at start; when even the hard limit is short, the server says so at
//! start rather than failing accepts and spool files under load.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::Connected;

/// Files the server may hold open besides its agent connections: spooled
/// uploads, memory-mapped files being scanned, the signatures, the state
/// folder, the admin and metrics listeners.
pub const OTHER_FILES: u64 = 1024;

/// The places of the agent listener's connections.
#[derive(Debug)]
pub struct Connections {
    places: Arc<Semaphore>,
    max: usize,
    refused: AtomicU64,
    /// Set when a connection was refused, cleared when one is admitted:
    /// the limit is logged once per burst of refusals.
    full: AtomicBool,
}

impl Connections {
    /// Room for `max` connections at once.
    pub fn new(max: usize) -> Self {
        Connections {
            places: Arc::new(Semaphore::new(max)),
            max,
            refused: AtomicU64::new(0),
            full: AtomicBool::new(false),
        }
    }

    /// `io`, holding a place until it is dropped; `None` (and `io` dropped,
    /// which closes it) when every place is taken.
    pub fn admit<IO>(&self, io: IO) -> Option<Counted<IO>> {
        match Arc::clone(&self.places).try_acquire_owned() {
            Ok(place) => {
                self.full.store(false, Ordering::Relaxed);
                Some(Counted { io, _place: place })
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if !self.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        max = self.max,
                        "every agent connection place is taken: new connections are closed until some end (server.max_connections)"
                    );
                }
                None
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.places.available_permits()
    }

    /// The most connections open at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections closed at accept for want of a place, since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// A connection holding one of the places of [`Connections`], given back
/// when it is dropped.
#[derive(Debug)]
pub struct Counted<IO> {
    io: IO,
    _place: OwnedSemaphorePermit,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What tonic tells requests of their connection (the peer's address, and
/// with TLS its certificates) is the connection's own.
impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Raises the process's soft limit of open files towards `wanted`, as far
/// as its hard limit allows, and returns the limit now in force.
pub fn raise_open_files(wanted: u64) -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let target = wanted.min(limit.rlim_max);
    if limit.rlim_cur >= target {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_and_given_back() {
        let connections = Connections::new(2);
        let first = connections.admit(()).expect("a place");
        let second = connections.admit(()).expect("a place");
        assert_eq!(connections.open(), 2);
        assert!(connections.admit(()).is_none(), "every place is taken");
        assert!(connections.admit(()).is_none());
        assert_eq!(connections.refused(), 2);
        drop(first);
        assert_eq!(connections.open(), 1);
        let third = connections.admit(()).expect("the place given back");
        assert!(!connections.full.load(Ordering::Relaxed));
        drop((second, third));
        assert_eq!(connections.open(), 0);
    }

    #[test]
    fn the_open_files_limit_is_raised_within_the_hard_limit() {
        let now = raise_open_files(0).expect("the limit can be read");
        assert!(now > 0);
        let raised = raise_open_files(now + 1).expect("raising within the hard limit");
        assert!(raised >= now, "never lowered");
        assert_eq!(
            raise_open_files(0).unwrap(),
            raised,
            "what it says is in force"
        );
    }
}
