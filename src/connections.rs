//! A listener's connections: at most `server.max_connections` open at
//! once on the agent listener ([`ADMIN_CONNECTIONS`] on the admin
//! listener, over TCP or its Unix socket), each given 10 seconds to start
//! speaking HTTP/2, and a process allowed to open that many files.
//!
//! Sessions are bounded by `server.max_agents`, but a connection costs the
//! server before any session: a file descriptor, HTTP/2 state, and up to a
//! flow-control window (4 MiB) of content buffered while its reader is
//! held back. Without a bound of their own, connections that never open a
//! session (a client that leaks channels, a flood) could take every
//! descriptor the process has, after which no agent, new or reconnecting,
//! would get in. A connection beyond the limit is closed as soon as it is
//! accepted, before its TLS handshake: its agent sees the SVM unavailable
//! and may pick another, and the log says so (at most once a minute). A
//! place is taken at accept and given back when the connection closes,
//! whichever way.
//!
//! A connection that never sends the HTTP/2 preface (a port scanner, a
//! half-open peer) would keep its place for ever: HTTP/2 pings a peer only
//! once the preface is in. So the preface must come within
//! [`PREFACE_WAIT`] of the accept (with TLS, of the end of the handshake,
//! which has its own 10 seconds), or the connection is closed; after it,
//! the pings of `server` find peers that are gone.
//!
//! A connection that sent its preface but has no call under way (a client
//! that leaks channels, each answering the pings) would keep its place for
//! ever too. So, as clamd closes a client idle for its `IdleTimeout`, an
//! agent connection with no call under way for `server.idle_timeout` is
//! closed: [`CallsLayer`] counts each call (until both its request and its
//! response bodies are gone) on the connection it came on, found by its
//! [`Ends`] in [`Calls`], and the connection's reads and writes fail once
//! it has been idle that long. Agents keep their session's `Connect`
//! stream open, so theirs never are; a client whose channel was closed
//! connects again for its next call. The close is abrupt (no GOAWAY: tonic
//! leaves the connection to hyper): a connection that read anything since
//! its idle time began (a request read then may not have begun its call
//! yet) is given a second more, once: a peer that keeps sending pings and
//! no call is closed all the same. A
//! request sent in the moment the connection closes fails with
//! UNAVAILABLE, to be sent again.
//! A leaked channel that keeps a call open (a health `Watch`, say) keeps
//! its place: that call is its client's to end. The admin listener's TCP
//! connections are closed the same way after [`ADMIN_IDLE`].
//!
//! At the end of shutdown's grace period, the connections still open are
//! closed at once ([`Connections::close_all`]), the same way, before the
//! server makes its last saves: tonic leaves each connection to a task of
//! its own, which would otherwise go on answering until the process exits,
//! with verdicts the saves do not hold.
//!
//! The default, twice `max_agents` and 64 more, leaves every agent room to
//! reconnect while its old connection is still being closed (a dead peer's
//! within 30 s), and tools (health checks, `lightagent`) room beside them
//! however few agents are allowed.
//!
//! One address may hold no more than `server.max_connections_per_address`
//! of the agent listener's places (`max_agents` by default, so that as
//! many agents as may connect can do so from behind one NAT): an agent
//! needs one connection, and without this bound one VM opening
//! connections (each keeping a call open) could take every place, and
//! keep every other agent out. The SVM's own addresses (loopback, or the
//! listener's address, which a tool on the SVM that connects to its name
//! comes from) are not bound: they are its own tools (`lightagent bench`,
//! one connection per simulated agent). The metrics listener bounds
//! addresses so too, to a few places each (see
//! [`METRICS_CONNECTIONS_PER_ADDRESS`](crate::metrics::METRICS_CONNECTIONS_PER_ADDRESS)).
//!
//! Linux starts most processes with a soft limit of 1,024 open files, fewer
//! than the default limits need. [`raise_open_files`] raises it to the hard
//! limit at start; when even that is short of the connections, the spool
//! files and [`OTHER_FILES`], the server says so at start rather than failing
//! accepts and spool files under load. Accepts that fail all the same are
//! tried again every 100 ms, and shown ([`Connections::accept_failure`])
//! until [`ACCEPT_FAILURE_SHOWN`] passes without one: agents connecting
//! meanwhile are turned away unseen, so the SVM's status says so
//! (CONNECTIONS_NOT_ACCEPTED).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use atomic_waker::AtomicWaker;
use http_body::{Body as HttpBody, Frame, SizeHint};
use parking_lot::Mutex;
use slab::Slab;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    body::Body,
    transport::server::{Connected, TcpConnectInfo, TlsConnectInfo},
};

/// Files the server should be able to open besides its agent connections
/// and its spool files (`uploads.spool_files`): the signatures, the state
/// folder, the admin and metrics listeners and their clients. This is room,
/// not a bound: a file that cannot be opened for want of descriptors fails
/// what needed it (an upload, with RESOURCE_EXHAUSTED), not the server.
pub const OTHER_FILES: u64 = 1 << 10;

/// The most `server.max_connections` may be.
pub const MAX_CONNECTIONS: usize = 1 << 20;

/// How long a connection has, from its accept (with TLS, from the end of
/// its handshake), to send the HTTP/2 preface. Until then HTTP/2 sends it
/// no pings, and nothing else would ever close it.
pub const PREFACE_WAIT: Duration = Duration::from_secs(10);

/// The HTTP/2 client preface: `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;

/// Connections accepted (with TLS, handshaken) and waiting for the server
/// to take them.
pub const ACCEPTED_QUEUE: usize = 64;

/// How often refused connections are logged, at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// How long after an accept that failed (out of file descriptors, say) the
/// listener counts as failing. The accept is tried again every 100 ms
/// while a client waits in the backlog, so a shortage that lasts keeps it
/// failing, whatever connections get in as descriptors come free now and
/// then (the status does not flap with them); it counts as accepting again
/// once this long has passed without a failure.
pub const ACCEPT_FAILURE_SHOWN: Duration = Duration::from_secs(30);

/// How many connections the admin listener takes at once: operators and
/// their tools need a few, and without a bound any local user (any member
/// of the socket's group) could take every descriptor the server has.
pub const ADMIN_CONNECTIONS: usize = 64;

/// How long an admin connection over TCP is kept with no call under way:
/// a tool makes its call as soon as it connects, and one that leaks its
/// connections (or a local user who opens them and calls nothing) must not
/// keep the places operators need. (Over the Unix socket, only the
/// socket's group can connect.)
pub const ADMIN_IDLE: Duration = Duration::from_secs(10);

/// A listener whose connections [`Connections`] bounds.
pub trait Listener: Send + Sync + 'static {
    type Stream: Send + 'static;
    /// The peer's address.
    type Peer: Send;
    /// The next connection, ready to use.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
    /// The connection's ends as its calls see them (see [`Ends::of`]), if
    /// it has such addresses.
    fn ends(stream: &Self::Stream, peer: &Self::Peer) -> Option<Ends>;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    type Peer = SocketAddr;

    /// The next connection, with Nagle's algorithm off (replies are small
    /// messages the client waits for: a request for content, a verdict;
    /// with Nagle on, one would wait for the client's delayed
    /// acknowledgement of the previous one, stalling the stream for 40 ms
    /// at a time on Linux).
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (tcp, peer) = TcpListener::accept(self).await?;
        let _ = tcp.set_nodelay(true);
        Ok((tcp, peer))
    }

    fn ends(stream: &TcpStream, peer: &SocketAddr) -> Option<Ends> {
        Some(Ends {
            local: stream.local_addr().ok()?,
            remote: *peer,
        })
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    type Peer = tokio::net::unix::SocketAddr;

    async fn accept(&self) -> io::Result<(UnixStream, Self::Peer)> {
        UnixListener::accept(self).await
    }

    fn ends(_: &UnixStream, _: &Self::Peer) -> Option<Ends> {
        None
    }
}

/// The places of a listener's connections.
#[derive(Debug)]
pub struct Connections {
    /// Whose connections they are, and what sets their number, for logs.
    whose: &'static str,
    limit: &'static str,
    places: Arc<Semaphore>,
    max: usize,
    /// Connections refused for want of a place.
    no_place: Refusals,
    /// Connections refused as their address holds every place it may.
    address_full: Refusals,
    /// Connections closed for sending no preface in time, since start.
    silent: Arc<AtomicU64>,
    /// TLS handshakes that failed or timed out.
    failed_handshakes: Refusals,
    /// The calls under way on each connection.
    calls: Arc<Calls>,
    /// How long a connection with no call under way is kept; `None`: for
    /// ever.
    idle_after: Option<Duration>,
    /// What closes them all at once.
    closing: Arc<Closing>,
    /// The places each address other than the SVM's own holds, when
    /// bound, and what sets their number, for logs.
    per_address: Option<(Arc<PerAddress>, &'static str)>,
    /// The last accept that failed, until a connection is accepted once
    /// it no longer counts (see [`AcceptFailure::recent`]).
    failing: Mutex<Option<AcceptFailure>>,
}

/// The last accept that failed for want of something the process needs
/// (file descriptors, say), not for its connection's sake, and how many
/// have failed since the run of failures began.
#[derive(Debug)]
struct AcceptFailure {
    at: Instant,
    error: String,
    failures: u64,
}

impl AcceptFailure {
    /// Whether the listener still counts as failing for it.
    fn recent(&self) -> bool {
        self.at.elapsed() < ACCEPT_FAILURE_SHOWN
    }

    /// Logs the end of the run of failures this one was the last of: the
    /// line that answers the warning its first one logged.
    fn log_end(&self, whose: &str) {
        tracing::info!(
            "{whose} connections: accepts no longer fail, after {} failures, the last {} s ago",
            self.failures,
            self.at.elapsed().as_secs()
        );
    }
}

/// The places each remote address holds, and how many it may: the agent
/// listener's connections and its `ScanFile` calls, the metrics
/// listener's connections.
#[derive(Debug)]
pub(crate) struct PerAddress {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One place of an address, given back when dropped.
#[derive(Debug)]
pub(crate) struct AddressPlace {
    of: Arc<PerAddress>,
    address: IpAddr,
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut held = self.of.held.lock();
        if let Some(count) = held.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.address);
            }
        }
    }
}

impl PerAddress {
    /// Room for `max` places an address.
    pub(crate) fn new(max: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            max,
            held: Mutex::default(),
        })
    }

    /// How many places an address may hold.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// The address whose places a connection between `ends` counts in:
    /// its remote one, unless it is one of the SVM's own (loopback, or the
    /// listener's address, which a tool on the SVM that connects to its
    /// name comes from), whose places are not bound.
    pub(crate) fn bound(ends: Option<Ends>) -> Option<IpAddr> {
        let (remote, local) = ends.map(|ends| {
            (
                ends.remote.ip().to_canonical(),
                ends.local.ip().to_canonical(),
            )
        })?;
        (!remote.is_loopback() && remote != local).then_some(remote)
    }

    /// A place for `address`, if it holds fewer than `max`.
    pub(crate) fn take(self: &Arc<Self>, address: IpAddr) -> Option<AddressPlace> {
        let mut held = self.held.lock();
        if held.get(&address).copied().unwrap_or(0) >= self.max {
            return None;
        }
        *held.entry(address).or_default() += 1;
        Some(AddressPlace {
            of: Arc::clone(self),
            address,
        })
    }
}

impl Connections {
    /// Room for `max` agent connections at once (at most
    /// [`MAX_CONNECTIONS`]), `per_address` of them from one address
    /// other than the SVM's own (loopback, the listener's), each closed
    /// once it has had no call under way for `idle_after`.
    pub fn new(max: usize, per_address: usize, idle_after: Duration) -> Self {
        Connections {
            idle_after: Some(idle_after),
            per_address: Some((
                PerAddress::new(per_address),
                "server.max_connections_per_address",
            )),
            ..Self::of("agent", "server.max_connections", max.min(MAX_CONNECTIONS))
        }
    }

    /// Room for the admin listener's [`ADMIN_CONNECTIONS`], each closed
    /// once it has had no call under way for [`ADMIN_IDLE`] (over TCP).
    pub fn admin() -> Self {
        Connections {
            idle_after: Some(ADMIN_IDLE),
            ..Self::of("admin", "at most 64", ADMIN_CONNECTIONS)
        }
    }

    /// Room for the metrics listener's
    /// [`METRICS_CONNECTIONS`](crate::metrics::METRICS_CONNECTIONS),
    /// [`METRICS_CONNECTIONS_PER_ADDRESS`](crate::metrics::METRICS_CONNECTIONS_PER_ADDRESS)
    /// of them from one address other than the SVM's own.
    pub fn metrics() -> Self {
        use crate::metrics::{METRICS_CONNECTIONS, METRICS_CONNECTIONS_PER_ADDRESS};
        Connections {
            per_address: Some((
                PerAddress::new(METRICS_CONNECTIONS_PER_ADDRESS),
                "the metrics listener's own bound",
            )),
            ..Self::of("metrics", "at most 16", METRICS_CONNECTIONS)
        }
    }

    fn of(whose: &'static str, limit: &'static str, max: usize) -> Self {
        Connections {
            whose,
            limit,
            places: Arc::new(Semaphore::new(max)),
            max,
            no_place: Refusals::default(),
            address_full: Refusals::default(),
            silent: Arc::default(),
            failed_handshakes: Refusals::default(),
            calls: Arc::default(),
            idle_after: None,
            closing: Arc::default(),
            per_address: None,
            failing: Mutex::default(),
        }
    }

    /// The layer that counts calls on these connections, for the service
    /// served on them.
    pub fn calls_layer(&self) -> CallsLayer {
        CallsLayer(Arc::clone(&self.calls))
    }

    /// The connections accepted on `listener` that find a place, for as
    /// long as the stream is held (tonic drops it when it stops accepting).
    pub fn incoming<L: Listener>(
        self: Arc<Self>,
        listener: L,
    ) -> ReceiverStream<io::Result<Counted<L::Stream>>> {
        let (accepted, incoming) = mpsc::channel(ACCEPTED_QUEUE);
        tokio::spawn(async move {
            loop {
                let (stream, _, place) = tokio::select! {
                    next = self.accept(&listener) => next,
                    () = accepted.closed() => return,
                };
                if accepted.send(Ok(place.hold(stream))).await.is_err() {
                    return;
                }
            }
        });
        ReceiverStream::new(incoming)
    }

    /// The next connection on `listener` that finds a place; those that
    /// find none are closed. A failed accept of one connection (reset
    /// before it was taken, or one of the network errors Linux passes on
    /// from it: see accept(2)) is passed over; any other (out of file
    /// descriptors, say) is logged at the start of a run of them, shown by
    /// [`Self::accept_failure`], and makes a pause rather than a spin.
    pub async fn accept<L: Listener>(&self, listener: &L) -> (L::Stream, L::Peer, Place) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) if connection_error(&err) => continue,
                Err(err) => {
                    self.failed_to_accept(&err);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.accepted();
            if let Some(place) = self.place(L::ends(&stream, &peer)) {
                return (stream, peer, place);
            }
        }
    }

    /// Remembers an accept that failed with `err`, and logs the first of
    /// a run of them (after the end of the run before, if no connection
    /// came to end it).
    fn failed_to_accept(&self, err: &io::Error) {
        let (over, began) = {
            let mut failing = self.failing.lock();
            let over = failing.take_if(|failure| !failure.recent());
            let failures = failing.as_ref().map_or(0, |failure| failure.failures) + 1;
            *failing = Some(AcceptFailure {
                at: Instant::now(),
                error: err.to_string(),
                failures,
            });
            (over, failures == 1)
        };
        if let Some(over) = over {
            over.log_end(self.whose);
        }
        if began {
            // EMFILE, ENFILE: out of file descriptors.
            let hint = match err.raw_os_error() {
                Some(libc::EMFILE | libc::ENFILE) => {
                    " (raise the limit of open files, LimitNOFILE= in the systemd unit, or lower server.max_connections and uploads.spool_files)"
                }
                _ => "",
            };
            tracing::warn!("cannot accept {} connections: {err}{hint}", self.whose);
        }
    }

    /// A connection was accepted: a run of failures that ended is
    /// forgotten, and logged as over.
    fn accepted(&self) {
        let over = self.failing.lock().take_if(|failure| !failure.recent());
        if let Some(over) = over {
            over.log_end(self.whose);
        }
    }

    /// Why accepts fail, when the last one failed within
    /// [`ACCEPT_FAILURE_SHOWN`]: connecting clients wait in the listener's
    /// backlog meanwhile (some get in as descriptors come free), or give
    /// up.
    pub fn accept_failure(&self) -> Option<String> {
        let failing = self.failing.lock();
        failing
            .as_ref()
            .filter(|failure| failure.recent())
            .map(|failure| failure.error.clone())
    }

    /// A place for a connection between `ends`, if one is free, and its
    /// address holds no more than it may; otherwise the refusal is counted
    /// (and logged, at most once every [`WARN_EVERY`]).
    fn place(&self, ends: Option<Ends>) -> Option<Place> {
        let of_address = match (&self.per_address, PerAddress::bound(ends)) {
            (Some((per_address, limit)), Some(address)) => match per_address.take(address) {
                Some(place) => Some(place),
                None => {
                    if let Some(since) = self.address_full.count() {
                        tracing::warn!(
                            last = %address,
                            max = per_address.max(),
                            refused = since,
                            "addresses hold every {} connection place they may: their new connections are closed until some end ({limit})",
                            self.whose
                        );
                    }
                    return None;
                }
            },
            _ => None,
        };
        if let Ok(place) = Arc::clone(&self.places).try_acquire_owned() {
            let idle = ends.zip(self.idle_after).map(|(ends, after)| IdleWatch {
                activity: self.calls.accepted(ends),
                calls: Arc::clone(&self.calls),
                ends,
                after,
                check: Some(Box::pin(tokio::time::sleep(after))),
                read_lately: false,
                graced: false,
            });
            return Some(Place {
                _permit: place,
                _address: of_address,
                silent: Arc::clone(&self.silent),
                whose: self.whose,
                idle,
                closable: Closable::new(&self.closing),
            });
        }
        if let Some(since) = self.no_place.count() {
            tracing::warn!(
                max = self.max,
                refused = since,
                "every {} connection place is taken: new connections are closed until some end ({})",
                self.whose,
                self.limit
            );
        }
        None
    }

    /// Closes every connection open now, and any accepted from now on:
    /// their reads and writes fail, as a broken connection's do, and their
    /// calls end with them. Resolves once every place is given back.
    pub async fn close_all(&self) {
        self.closing.close();
        // Looked at rather than waited for with the places, which would
        // take each as it comes back: `open` would count them as open.
        while self.open() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
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

    /// Connections closed at accept for want of a place, or of one their
    /// address may take, since start.
    pub fn refused(&self) -> u64 {
        self.no_place.count.load(Ordering::Relaxed)
            + self.address_full.count.load(Ordering::Relaxed)
    }

    /// Connections closed for sending no HTTP/2 preface within
    /// [`PREFACE_WAIT`], since start.
    pub fn silent(&self) -> u64 {
        self.silent.load(Ordering::Relaxed)
    }

    /// Connections closed for having no call under way for their idle
    /// time, since start.
    pub fn idle_closed(&self) -> u64 {
        self.calls.closed_idle.load(Ordering::Relaxed)
    }

    /// Counts a TLS handshake with `peer` that failed for `why`, and logs
    /// it as a warning at most once a minute, with how many
    /// failed since: agents refused for a certificate (expired, of another
    /// CA, none where one is required) are refused before any session, and
    /// the log is where an operator finds out why they stay away. A
    /// scanner's probes take one line a minute.
    pub fn handshake_failed(&self, peer: SocketAddr, why: &dyn std::fmt::Display) {
        if let Some(since) = self.failed_handshakes.count() {
            tracing::warn!(
                last = %peer,
                failed = since,
                "TLS handshakes with {} clients failed; the last: {why}",
                self.whose
            );
        }
    }

    /// TLS handshakes that failed or timed out, since start.
    pub fn failed_handshakes(&self) -> u64 {
        self.failed_handshakes.count.load(Ordering::Relaxed)
    }
}

/// Connections refused for one reason: how many since start, and when they
/// were last logged, with the count then.
#[derive(Debug, Default)]
struct Refusals {
    count: AtomicU64,
    logged: Mutex<Option<(Instant, u64)>>,
}

impl Refusals {
    /// Counts one; when it is time to log them (once every
    /// [`WARN_EVERY`]), how many came since they were last logged.
    fn count(&self) -> Option<u64> {
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self.logged.lock();
        if logged.is_some_and(|(at, _)| at.elapsed() < WARN_EVERY) {
            return None;
        }
        let since = count - logged.map_or(0, |(_, then)| then);
        *logged = Some((Instant::now(), count));
        Some(since)
    }
}

/// One of the places of [`Connections`], taken at accept.
#[derive(Debug)]
pub struct Place {
    _permit: OwnedSemaphorePermit,
    _address: Option<AddressPlace>,
    /// Where a connection cut off for its silence is counted.
    silent: Arc<AtomicU64>,
    whose: &'static str,
    /// The calls under way on the connection, when it is closed once idle.
    idle: Option<IdleWatch>,
    closable: Closable,
}

/// What closes a listener's connections at once: a switch, and the waker
/// of each connection, to be woken when its I/O waits.
#[derive(Debug, Default)]
struct Closing {
    closed: AtomicBool,
    wakers: Mutex<Slab<Arc<AtomicWaker>>>,
}

impl Closing {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for (_, waker) in self.wakers.lock().iter() {
            waker.wake();
        }
    }
}

/// A connection's part in [`Closing`], until it is dropped.
#[derive(Debug)]
struct Closable {
    closing: Arc<Closing>,
    waker: Arc<AtomicWaker>,
    key: usize,
}

impl Closable {
    fn new(closing: &Arc<Closing>) -> Self {
        let waker = Arc::new(AtomicWaker::new());
        let key = closing.wakers.lock().insert(Arc::clone(&waker));
        Closable {
            closing: Arc::clone(closing),
            waker,
            key,
        }
    }

    /// Whether the connection was closed; when `waiting` (its I/O would
    /// wait), `cx` is woken once it is. One atomic load otherwise: this is
    /// asked at every read and write.
    fn is_closed(&self, cx: &mut Context<'_>, waiting: bool) -> bool {
        if self.closing.closed.load(Ordering::Acquire) {
            return true;
        }
        if !waiting {
            return false;
        }
        self.waker.register(cx.waker());
        // Closed in between: the wake may have come before the register.
        self.closing.closed.load(Ordering::Acquire)
    }
}

impl Drop for Closable {
    fn drop(&mut self) {
        self.closing.wakers.lock().remove(self.key);
    }
}

impl Place {
    /// `io` (the accepted connection, or the TLS stream over it) holding
    /// the place until it is dropped, and given [`PREFACE_WAIT`] from now
    /// to send the HTTP/2 preface.
    pub fn hold<IO>(self, io: IO) -> Counted<IO> {
        Counted {
            io,
            place: self,
            preface: Some(Preface {
                deadline: Box::pin(tokio::time::sleep(PREFACE_WAIT)),
                read: 0,
            }),
        }
    }
}

/// A connection holding one of the places of [`Connections`], given back
/// when it is dropped.
#[derive(Debug)]
pub struct Counted<IO> {
    io: IO,
    place: Place,
    /// Until the HTTP/2 preface is in: a read that waits past the deadline
    /// fails, and HTTP/2 closes the connection.
    preface: Option<Preface>,
}

/// What closes a connection once it has had no call under way for
/// `after`: its reads, or its writes (a peer that takes nothing keeps the
/// connection from reading), fail once they would wait. Its entry in
/// [`Calls`] goes with it.
#[derive(Debug)]
struct IdleWatch {
    activity: Arc<Activity>,
    calls: Arc<Calls>,
    ends: Ends,
    after: Duration,
    /// When to look again whether the idle time is over; `None` once the
    /// connection was closed for it.
    check: Option<Pin<Box<Sleep>>>,
    /// Something was read since the idle time now running was last looked
    /// at: HTTP/2 begins a call only once its reads would wait, so a
    /// request read just as the idle time runs out is not counted yet.
    read_lately: bool,
    /// The idle time now running was already extended by [`READ_GRACE`]:
    /// it is given once, or a peer that keeps sending something other
    /// than calls (pings) would keep its place for ever.
    graced: bool,
}

/// How long a connection that has just read something is kept past its
/// idle time (see [`IdleWatch::read_lately`]).
const READ_GRACE: Duration = Duration::from_secs(1);

impl IdleWatch {
    /// Whether the connection has had no call under way for its idle
    /// time; until then, the check is due again when it could first be.
    fn is_over(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(check) = &mut self.check else {
            return false;
        };
        while check.as_mut().poll(cx).is_ready() {
            let left = match self.activity.idle_left(self.after) {
                Some(left) if left.is_zero() => {
                    if self.graced || !std::mem::take(&mut self.read_lately) {
                        return true;
                    }
                    self.graced = true;
                    READ_GRACE
                }
                // A call is or was under way since the last look: the idle
                // time running is a new one.
                left => {
                    self.graced = false;
                    self.read_lately = false;
                    left.unwrap_or(self.after)
                }
            };
            check.as_mut().reset(Instant::now() + left);
        }
        false
    }
}

impl Drop for IdleWatch {
    fn drop(&mut self) {
        let mut by_ends = self.calls.by_ends.lock();
        // A connection between the same ends accepted since has its own.
        if by_ends
            .get(&self.ends)
            .is_some_and(|held| Arc::ptr_eq(held, &self.activity))
        {
            by_ends.remove(&self.ends);
        }
    }
}

impl<IO> Counted<IO> {
    /// `poll`, or a failure once the connection has been idle too long
    /// and `poll` would wait (see [`IdleWatch`]).
    fn or_idle<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let Some(idle) = &mut self.place.idle else {
            return poll;
        };
        if !poll.is_pending() || !idle.is_over(cx) {
            return poll;
        }
        idle.check = None;
        idle.calls.closed_idle.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            peer = %idle.ends.remote,
            "an {} connection had no call under way for {:?}; closed",
            self.place.whose,
            idle.after
        );
        let message = format!("no call under way for {:?}", idle.after);
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, message)))
    }

    /// `poll`, or a failure once the server closed its connections (see
    /// [`Connections::close_all`]).
    fn or_closed<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if matches!(poll, Poll::Ready(Err(_)))
            || !self.place.closable.is_closed(cx, poll.is_pending())
        {
            return poll;
        }
        let message = "the server is shutting down";
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            message,
        )))
    }
}

#[derive(Debug)]
struct Preface {
    deadline: Pin<Box<Sleep>>,
    read: usize,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let read = this.or_silent(cx, read, buf.filled().len() - before);
        this.or_closed(cx, read)
    }
}

impl<IO> Counted<IO> {
    /// A read of `bytes` (`read`), or a failure once the connection has
    /// been silent too long: until its HTTP/2 preface is in, past
    /// [`PREFACE_WAIT`]; after it, idle (see [`Self::or_idle`]).
    fn or_silent(
        &mut self,
        cx: &mut Context<'_>,
        read: Poll<io::Result<()>>,
        bytes: usize,
    ) -> Poll<io::Result<()>> {
        let Some(preface) = &mut self.preface else {
            if let (Poll::Ready(Ok(())), Some(idle)) = (&read, &mut self.place.idle) {
                idle.read_lately |= bytes > 0;
            }
            return self.or_idle(cx, read);
        };
        match read {
            Poll::Ready(Ok(())) => {
                preface.read += bytes;
                if preface.read >= PREFACE_LEN {
                    self.preface = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if preface.deadline.as_mut().poll(cx).is_ready() => {
                self.preface = None;
                self.place.silent.fetch_add(1, Ordering::Relaxed);
                let whose = self.place.whose;
                tracing::debug!("an {whose} connection sent no HTTP/2 preface in time; closed");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no HTTP/2 preface within {PREFACE_WAIT:?}"),
                )))
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        let written = self.or_idle(cx, written);
        self.or_closed(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        let written = self.or_idle(cx, written);
        self.or_closed(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        let flushed = self.or_idle(cx, flushed);
        self.or_closed(cx, flushed)
    }

    /// Bounded as writes are: with TLS, a shutdown writes a close_notify,
    /// which a peer that reads nothing (its window shut) would keep waiting
    /// for ever, its connection's place held.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = Pin::new(&mut self.io).poll_shutdown(cx);
        let shut = self.or_idle(cx, shut);
        self.or_closed(cx, shut)
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

/// The calls under way on each connection that is closed once idle, by
/// its ends (the peer's address alone is not unique: one client port may
/// reach two addresses of the server at once).
#[derive(Debug, Default)]
pub struct Calls {
    by_ends: Mutex<HashMap<Ends, Arc<Activity>>>,
    /// Connections closed for being idle, since start.
    closed_idle: AtomicU64,
}

/// The calls under way on one connection.
#[derive(Debug)]
struct Activity {
    open: AtomicUsize,
    /// When the last call ended (at first, when the connection was
    /// accepted).
    last_end: Mutex<Instant>,
}

impl Calls {
    /// Starts keeping count for a connection accepted between `ends`.
    fn accepted(&self, ends: Ends) -> Arc<Activity> {
        let activity = Arc::new(Activity {
            open: AtomicUsize::new(0),
            last_end: Mutex::new(Instant::now()),
        });
        self.by_ends.lock().insert(ends, Arc::clone(&activity));
        activity
    }

    /// A call begun on the connection between `ends`, if it is one
    /// counted.
    fn begin(&self, ends: Ends) -> Option<Call> {
        let activity = Arc::clone(self.by_ends.lock().get(&ends)?);
        activity.open.fetch_add(1, Ordering::AcqRel);
        Some(Call(activity))
    }
}

impl Activity {
    /// How long until the connection will have had no call under way for
    /// `after`; `None` while a call is under way.
    fn idle_left(&self, after: Duration) -> Option<Duration> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(after.saturating_sub(self.last_end.lock().elapsed()))
    }
}

/// A call under way, until dropped (with both its bodies).
#[derive(Debug)]
struct Call(Arc<Activity>);

impl Drop for Call {
    fn drop(&mut self) {
        // The time first: a check that sees no call open sees when the
        // last one ended.
        *self.0.last_end.lock() = Instant::now();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts each call on the connection it came on (see [`Calls`]): the
/// call is under way until both its request and its response bodies are
/// dropped.
#[derive(Debug, Clone)]
pub struct CallsLayer(Arc<Calls>);

impl<S> tower_layer::Layer<S> for CallsLayer {
    type Service = CallsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallsService {
            inner,
            calls: Arc::clone(&self.0),
        }
    }
}

/// A service whose calls [`CallsLayer`] counts.
#[derive(Debug, Clone)]
pub struct CallsService<S> {
    inner: S,
    calls: Arc<Calls>,
}

type CallFuture<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for CallsService<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = CallFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let call = Ends::of(request.extensions()).and_then(|ends| self.calls.begin(ends));
        let Some(call) = call.map(Arc::new) else {
            return Box::pin(self.inner.call(request));
        };
        let holding = |call: &Arc<Call>| {
            let call = Arc::clone(call);
            move |body| Body::new(Holding { body, _keep: call })
        };
        let response = self.inner.call(request.map(holding(&call)));
        Box::pin(async move { Ok(response.await?.map(holding(&call))) })
    }
}

/// A body that keeps something while it lives: its call under way.
struct Holding<T> {
    body: Body,
    _keep: T,
}

impl<T: Unpin> HttpBody for Holding<T> {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The two ends of a TCP connection: what tells it from the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ends {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Ends {
    /// The ends of the connection a call came on, over TCP with or without
    /// TLS.
    pub fn of(extensions: &http::Extensions) -> Option<Ends> {
        let tcp = extensions.get::<TcpConnectInfo>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(TlsConnectInfo::get_ref)
        })?;
        Some(Ends {
            local: tcp.local_addr()?,
            remote: tcp.remote_addr()?,
        })
    }
}

/// Whether an accept failed for its connection's sake alone: the peer
/// gave up before it was taken, or a network error Linux passes on from
/// the connection (accept(2) asks that these be taken as EAGAIN), or a
/// firewall rule refused it.
fn connection_error(err: &io::Error) -> bool {
    use io::ErrorKind::*;
    let passed_on = matches!(
        err.raw_os_error(),
        Some(
            libc::ENETDOWN
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::EPERM
        )
    );
    passed_on
        || matches!(
            err.kind(),
            ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut
        )
}

/// Raises the process's soft limit of open files to its hard limit, as
/// servers written in Go do at start, and returns the limit now in force.
/// (The soft limit is low for programs that use `select`, which this one
/// does not.)
pub fn raise_open_files() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur >= limit.rlim_max {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_max)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn places_are_taken_and_given_back() {
        let connections = Connections::new(2, 2, Duration::from_secs(300));
        let first = connections.place(None).expect("a place");
        let second = connections.place(None).expect("a place");
        assert_eq!(connections.open(), 2);
        assert!(connections.place(None).is_none(), "every place is taken");
        assert!(connections.place(None).is_none());
        assert_eq!(connections.refused(), 2);
        drop(first);
        assert_eq!(connections.open(), 1);
        let third = connections.place(None).expect("the place given back");
        drop((second, third));
        assert_eq!(connections.open(), 0);
    }

    /// One address holds at most its share of the places; the SVM's own
    /// addresses (loopback, the listener's), and other addresses, are not
    /// held back by it.
    #[tokio::test]
    async fn one_address_holds_at_most_its_share() {
        let connections = Connections::new(10, 2, Duration::from_secs(300));
        let from = |remote: &str| {
            Some(Ends {
                local: "10.0.0.1:7405".parse().unwrap(),
                remote: remote.parse().unwrap(),
            })
        };
        let first = connections.place(from("10.0.0.9:1001")).expect("a place");
        let _second = connections.place(from("10.0.0.9:1002")).expect("a place");
        assert!(
            connections.place(from("10.0.0.9:1003")).is_none(),
            "its share is taken"
        );
        assert!(
            connections.place(from("[::ffff:10.0.0.9]:1004")).is_none(),
            "the same address over IPv6"
        );
        assert_eq!(connections.refused(), 2);
        let _other = connections
            .place(from("10.0.0.10:1001"))
            .expect("another address");
        let own: Vec<_> = ["127.0.0.1", "127.0.0.1", "[::1]", "10.0.0.1", "10.0.0.1"]
            .iter()
            .map(|ip| connections.place(from(&format!("{ip}:1001"))))
            .collect();
        assert!(
            own.iter().all(Option::is_some),
            "the SVM's own addresses are not bound"
        );
        drop(first);
        assert!(
            connections.place(from("10.0.0.9:1005")).is_some(),
            "given back"
        );

        // The metrics listener's too: one scraper cannot keep out another.
        let metrics = Connections::metrics();
        let held: Vec<_> = (0..crate::metrics::METRICS_CONNECTIONS_PER_ADDRESS)
            .map(|port| metrics.place(from(&format!("10.0.0.9:{port}"))))
            .collect();
        assert!(held.iter().all(Option::is_some));
        assert!(metrics.place(from("10.0.0.9:5")).is_none(), "its share");
        assert!(metrics.place(from("10.0.0.10:1")).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_preface_is_cut_off() {
        let connections = Connections::new(2, 2, Duration::from_secs(300));
        let (client, server) = tokio::io::duplex(64);
        let mut silent = connections.place(None).unwrap().hold(server);
        let mut buf = [0; 64];
        let err = silent.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(connections.silent(), 1);
        drop((silent, client));
        assert_eq!(connections.open(), 0);

        let (mut client, server) = tokio::io::duplex(64);
        let mut speaking = connections.place(None).unwrap().hold(server);
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut preface = [0; PREFACE_LEN];
        speaking.read_exact(&mut preface).await.unwrap();
        tokio::time::sleep(PREFACE_WAIT * 2).await;
        client.write_all(b"later").await.unwrap();
        let read = speaking.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..read], b"later", "no deadline once the preface is in");
    }

    /// A connection past its preface, from a client at `port`, with the
    /// client's end.
    async fn speaking(
        connections: &Connections,
        port: u16,
    ) -> (
        tokio::io::DuplexStream,
        Counted<tokio::io::DuplexStream>,
        Ends,
    ) {
        let ends = Ends {
            local: "127.0.0.1:7405".parse().unwrap(),
            remote: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let (mut client, server) = tokio::io::duplex(64);
        let mut counted = connections.place(Some(ends)).unwrap().hold(server);
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        counted.read_exact(&mut [0; PREFACE_LEN]).await.unwrap();
        (client, counted, ends)
    }

    /// While the connections close at shutdown, those still open are
    /// counted as open, no more.
    #[tokio::test(start_paused = true)]
    async fn closing_every_connection_counts_those_still_open() {
        let connections = Arc::new(Connections::new(4, 4, Duration::from_secs(300)));
        let (_a, first, _) = speaking(&connections, 50001).await;
        let (_b, second, _) = speaking(&connections, 50002).await;
        let closing = tokio::spawn({
            let connections = Arc::clone(&connections);
            async move { connections.close_all().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(connections.open(), 2);
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(connections.open(), 1);
        assert!(!closing.is_finished());
        drop(second);
        closing.await.unwrap();
        assert_eq!(connections.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_no_call_under_way_is_closed_once_idle() {
        let idle = Duration::from_secs(10);
        let connections = Connections::new(4, 4, idle);
        let mut buf = [0; 64];

        // A call under way keeps it, however long.
        let (_client, mut counted, ends) = speaking(&connections, 50000).await;
        let call = connections
            .calls
            .begin(ends)
            .expect("the connection is counted");
        let waited = tokio::time::timeout(idle * 6, counted.read(&mut buf)).await;
        assert!(waited.is_err(), "still open");
        drop(call);
        let ended = Instant::now();
        let err = counted.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(ended.elapsed() >= idle && ended.elapsed() <= idle * 2);
        assert_eq!(connections.idle_closed(), 1);
        drop(counted);
        assert!(connections.calls.by_ends.lock().is_empty(), "forgotten");

        // Something read as the idle time ends (a request whose call is not
        // begun yet) gets a second more.
        let accepted = Instant::now();
        let (mut client, mut counted, _) = speaking(&connections, 50001).await;
        tokio::time::sleep(idle - Duration::from_millis(100)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(counted.read(&mut buf).await.unwrap(), 1);
        assert!(counted.read(&mut buf).await.is_err());
        assert_eq!(accepted.elapsed(), idle + READ_GRACE);

        // Reads that go on without a call (pings, say) do not keep it:
        // the second is given once.
        let accepted = Instant::now();
        let (mut client, mut counted, _) = speaking(&connections, 50003).await;
        let pinging = tokio::spawn(async move {
            loop {
                tokio::time::sleep(READ_GRACE * 9 / 10).await;
                if client.write_all(b"p").await.is_err() {
                    return;
                }
            }
        });
        let reading = async {
            loop {
                if let Err(err) = counted.read(&mut buf).await {
                    return err;
                }
            }
        };
        let err = tokio::time::timeout(idle * 3, reading)
            .await
            .expect("closed though it reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(accepted.elapsed() <= idle + READ_GRACE);
        drop(counted);
        pinging.await.unwrap();

        // A peer that takes nothing keeps the connection from reading: its
        // writes fail once it is idle.
        let accepted = Instant::now();
        let (_client, mut counted, _) = speaking(&connections, 50002).await;
        let written = tokio::time::timeout(idle * 2, counted.write_all(&[0; 1024])).await;
        let err = written.expect("closed once idle").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(accepted.elapsed(), idle);
        assert_eq!(connections.idle_closed(), 4);
    }

    #[tokio::test]
    async fn connections_with_a_place_are_accepted_with_nagle_off() {
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Connections::new(1, 1, Duration::from_secs(300)));
        let mut incoming = Arc::clone(&connections).incoming(listener);
        let _client = TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.io.nodelay().unwrap());
        let mut refused = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0; 1];
        assert_eq!(refused.read(&mut buf).await.unwrap(), 0, "closed at once");
        assert_eq!(connections.refused(), 1);
    }

    /// A listener whose accepts give what `next` sends: in-memory
    /// connections, or errors.
    struct Sent(tokio::sync::Mutex<mpsc::UnboundedReceiver<io::Result<()>>>);

    impl Listener for Sent {
        type Stream = tokio::io::DuplexStream;
        type Peer = ();

        async fn accept(&self) -> io::Result<(Self::Stream, ())> {
            self.0.lock().await.recv().await.expect("sender kept")?;
            Ok((tokio::io::duplex(64).0, ()))
        }

        fn ends(_: &Self::Stream, _: &()) -> Option<Ends> {
            None
        }
    }

    /// An accept that fails for want of descriptors shows for
    /// [`ACCEPT_FAILURE_SHOWN`] after the last such failure, connections
    /// accepted meanwhile or not; a connection's own failure shows nothing.
    /// Each run of failures is logged as it begins and as it ends.
    #[tokio::test(start_paused = true)]
    async fn accepts_failing_show_until_they_stop_for_a_while() {
        let (logged, _logging) = crate::testlog::Logged::capture();
        let connections = Arc::new(Connections::new(4, 4, Duration::from_secs(300)));
        let (next, accepts) = mpsc::unbounded_channel();
        let listener = Arc::new(Sent(tokio::sync::Mutex::new(accepts)));
        let accept = || {
            let (connections, listener) = (Arc::clone(&connections), Arc::clone(&listener));
            tokio::spawn(async move { connections.accept(&*listener).await.2 })
        };
        let settle = || tokio::time::sleep(Duration::from_millis(150));
        let mut accepting = accept();

        for own in [
            io::ErrorKind::ConnectionReset.into(),
            io::Error::from_raw_os_error(libc::EPROTO),
        ] {
            next.send(Err(own)).unwrap();
            settle().await;
            assert_eq!(connections.accept_failure(), None, "the connection's own");
        }

        next.send(Err(io::Error::from_raw_os_error(libc::EMFILE)))
            .unwrap();
        settle().await;
        let shown = connections.accept_failure().expect("out of descriptors");
        assert!(shown.contains("os error 24"), "{shown}");
        tokio::time::sleep(ACCEPT_FAILURE_SHOWN - Duration::from_secs(1)).await;
        next.send(Ok(())).unwrap();
        let _first = (&mut accepting).await.unwrap();
        assert!(
            connections.accept_failure().is_some(),
            "a connection got in as a descriptor came free: still failing"
        );
        accepting = accept();
        next.send(Err(io::Error::from_raw_os_error(libc::ENFILE)))
            .unwrap();
        settle().await;
        tokio::time::sleep(ACCEPT_FAILURE_SHOWN - Duration::from_secs(1)).await;
        assert!(connections.accept_failure().is_some(), "failed again since");

        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(connections.accept_failure(), None, "aged");
        next.send(Ok(())).unwrap();
        let _second = accepting.await.unwrap();
        assert!(connections.failing.lock().is_none(), "over, and logged so");
        assert_eq!(connections.open(), 2);
        assert_eq!(
            (
                logged.lines("cannot accept"),
                logged.lines("no longer fail")
            ),
            (1, 1)
        );

        // A run that ends with no connection coming is logged as over when
        // the next begins.
        accepting = accept();
        for _ in 0..2 {
            next.send(Err(io::Error::from_raw_os_error(libc::EMFILE)))
                .unwrap();
            settle().await;
            tokio::time::sleep(ACCEPT_FAILURE_SHOWN).await;
        }
        assert_eq!(
            (
                logged.lines("cannot accept"),
                logged.lines("no longer fail")
            ),
            (3, 2)
        );
        next.send(Ok(())).unwrap();
        let _third = accepting.await.unwrap();
        assert_eq!(logged.lines("no longer fail"), 3);
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let raised = raise_open_files().expect("the limit can be read");
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!((raised, limit.rlim_cur), (limit.rlim_max, limit.rlim_max));
    }
}
