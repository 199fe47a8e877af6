//! The shutdown signal every long-running task watches.
//!
//! The server holds the sending side of a `watch` channel and sets it to
//! `true` when it shuts down; sessions, streams, the reporter and the
//! monitor each hold a receiver and end (after their last words: a final
//! reply, a last report) once it turns. The state keepers wait on another
//! such channel, turned once serving has stopped, so that their last save
//! comes after the last verdict.

use tokio::sync::watch;

/// Resolves once the server shuts down.
pub async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&down| down).await;
}
