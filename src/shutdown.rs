//! The shutdown signal every long-running task watches.
//!
//! The server holds the sending side of a `watch` channel and sets it to
//! `true` when it shuts down; sessions, streams, the reporter and the
//! monitor each hold a receiver and end (after their last words: a final
//! reply, a last report) once it turns. The state keepers wait on another
//! such channel, turned once serving has stopped, so that their last save
//! comes after the last verdict.

use std::time::Duration;

use tokio::{
    sync::watch,
    time::{Interval, MissedTickBehavior},
};

/// Resolves once the server shuts down.
pub async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&down| down).await;
}

/// The looks of a periodic check of files (signatures, TLS files), every
/// period from one period on, until shutdown. Looks that fell behind (a
/// long reload, a paused VM) are not made back to back: two looks in a row
/// that find the same files must prove they held still.
pub struct Periodic {
    ticker: Interval,
    shutdown: watch::Receiver<bool>,
}

impl Periodic {
    pub async fn start(period: Duration, shutdown: watch::Receiver<bool>) -> Periodic {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await;
        Periodic { ticker, shutdown }
    }

    /// Waits for the next look; false once the server shuts down.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.ticker.tick() => true,
            () = shut_down(&mut self.shutdown) => false,
        }
    }
}
