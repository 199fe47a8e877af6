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

use std::time::Duration;

use tokio::{
    sync::watch,
    time::{Interval, MissedTickBehavior},
};

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
