//! The shutdown signal every long-running task watches, and the ticker of
//! the tasks that work periodically until then.
//!
//! The server holds the sending side of a `watch` channel and sets it to
//! `true` when it shuts down; sessions, streams, the reporter and the
//! monitor each hold a receiver and end (after their last words: a final
//! reply, a last report) once it turns. The state keepers wait on another
//! such channel, turned once serving has stopped, so that their last save
//! comes after the last verdict.
//!
//! [`Periodic`] ticks the tasks that do something every so often and
//! nothing at shutdown: the status monitor, the infrastructure probe, and
//! the checks of the signatures and TLS files on disk.
//!
//! [`HealthUntilShutdown`] ends the standard health service's Watch calls
//! at shutdown, which would otherwise never end.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    sync::watch,
    time::{Interval, MissedTickBehavior},
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_server::Health};

/// Resolves once the server shuts down.
pub async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&down| down).await;
}

/// Ticks every period until shutdown. Ticks that fell behind (a long
/// reload, a paused VM) are not made back to back: a periodic check must
/// not find the same files twice within a moment (two looks in a row that
/// find the same files prove they held still), and a load sample or probe
/// made late is as good as one made in time.
pub struct Periodic {
    ticker: Interval,
    shutdown: watch::Receiver<bool>,
}

impl Periodic {
    /// Ticks at once, then every `period`.
    pub fn now_and_every(period: Duration, shutdown: watch::Receiver<bool>) -> Periodic {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Periodic { ticker, shutdown }
    }

    /// Ticks every `period`, from one period on.
    pub async fn every(period: Duration, shutdown: watch::Receiver<bool>) -> Periodic {
        let mut periodic = Periodic::now_and_every(period, shutdown);
        periodic.ticker.tick().await;
        periodic
    }

    /// Waits for the next tick; false once the server shuts down.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.ticker.tick() => true,
            () = shut_down(&mut self.shutdown) => false,
        }
    }
}

/// The standard health service `H`, whose Watch calls end once the server
/// shuts down, after the status they hold then (NOT_SERVING, set as
/// shutdown begins). A stock client that watches a server's health (gRPC's
/// client-side health checking does) would otherwise keep its call, and
/// its connection, open for the whole grace period, which the server then
/// waits out before it stops. The client sees the call end, and watches
/// again elsewhere, or here once the server is back.
pub struct HealthUntilShutdown<H> {
    inner: H,
    shutdown: watch::Receiver<bool>,
}

impl<H> HealthUntilShutdown<H> {
    pub fn new(inner: H, shutdown: watch::Receiver<bool>) -> Self {
        HealthUntilShutdown { inner, shutdown }
    }
}

#[tonic::async_trait]
impl<H: Health> Health for HealthUntilShutdown<H> {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchUntilShutdown<H::WatchStream>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let mut shutdown = self.shutdown.clone();
        let down = Box::pin(async move { shut_down(&mut shutdown).await });
        Ok(Response::new(WatchUntilShutdown {
            statuses: Box::pin(statuses),
            down,
            ending: false,
        }))
    }
}

/// A Watch call's statuses, until shutdown (see [`HealthUntilShutdown`]).
pub struct WatchUntilShutdown<S> {
    statuses: Pin<Box<S>>,
    down: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The server shuts down: the status already set (NOT_SERVING) is sent,
    /// then the call ends.
    ending: bool,
}

impl<S: Stream> Stream for WatchUntilShutdown<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if !self.ending {
            self.ending = self.down.as_mut().poll(cx).is_ready();
        }
        match self.statuses.as_mut().poll_next(cx) {
            Poll::Pending if self.ending => Poll::Ready(None),
            polled => polled,
        }
    }
}
