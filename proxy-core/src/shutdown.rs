//! Graceful shutdown: every connection handler holds a [`Shutdown`] subscribed to one
//! broadcast channel; dropping (or sending on) the sender tells all of them at once.

use tokio::sync::broadcast;

/// Completes when the proxy shuts down (the broadcast sender was dropped or sent).
pub struct Shutdown {
    is_shutdown: bool,
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    /// A listener for `notify`.
    pub fn new(notify: broadcast::Receiver<()>) -> Self {
        Self {
            is_shutdown: false,
            notify,
        }
    }

    /// Waits for the shutdown notice (returns at once after it came).
    pub async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        let _ = self.notify.recv().await;
        self.is_shutdown = true;
    }
}
