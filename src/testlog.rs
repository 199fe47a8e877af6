//! What a test logs, captured to be looked at (tests only).

use std::{io, sync::Arc};

use parking_lot::Mutex;

/// What is logged on the thread that holds the guard [`Logged::capture`]
/// gives.
#[derive(Clone, Default)]
pub struct Logged(Arc<Mutex<Vec<u8>>>);

impl Logged {
    /// Captures what this thread logs (at the info level and above) while
    /// the guard is held.
    pub fn capture() -> (Logged, tracing::subscriber::DefaultGuard) {
        let logged = Logged::default();
        let writer = logged.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        (logged, tracing::subscriber::set_default(subscriber))
    }

    /// How many lines logged so far hold `text`.
    pub fn lines(&self, text: &str) -> usize {
        let logged = self.0.lock();
        let logged = String::from_utf8_lossy(&logged);
        logged.lines().filter(|line| line.contains(text)).count()
    }
}

impl io::Write for Logged {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
