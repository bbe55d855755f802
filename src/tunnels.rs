//! The upgraded connections (tunnels) that one client connection carries.
//!
//! An HTTP/1.1 connection leaves hyper's connection future once its 101 response is sent,
//! and the tunnel then runs in a task of its own. The listener waits on [`Tunnels`] after
//! hyper is done, so the connection keeps its `limits.max_connections` slot and its drain
//! watcher until the last tunnel ends, and it signals the tunnels to close at drain.

use tokio::sync::watch;

/// Open tunnels of one client connection, and the request to close them.
#[derive(Debug)]
pub struct Tunnels {
    open: watch::Sender<usize>,
    closing: watch::Sender<bool>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels { open: watch::Sender::new(0), closing: watch::Sender::new(false) }
    }
}

impl Tunnels {
    /// Counts a tunnel as open until the returned guard drops. Call it before the response
    /// that switches protocols is returned, so that the count is already up when hyper's
    /// connection future ends.
    pub fn open(&self) -> TunnelGuard {
        self.open.send_modify(|count| *count += 1);
        TunnelGuard { open: self.open.clone(), closing: self.closing.subscribe() }
    }

    /// Signals every open tunnel, and any opened later, to close.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }

    /// Returns the number of open tunnels.
    pub fn count(&self) -> usize {
        *self.open.borrow()
    }

    /// Resolves once no tunnel is open.
    pub async fn all_closed(&self) {
        let mut open = self.open.subscribe();
        // The sender lives in `self`, so the wait ends only by a change, never by a closed
        // channel.
        let _ = open.wait_for(|count| *count == 0).await;
    }
}

/// Marks one tunnel as open while it lives.
#[derive(Debug)]
pub struct TunnelGuard {
    open: watch::Sender<usize>,
    closing: watch::Receiver<bool>,
}

impl TunnelGuard {
    /// Resolves once [`Tunnels::close_all`] was called. Never resolves if the connection's
    /// [`Tunnels`] was dropped without that call.
    pub async fn closing(&mut self) {
        if self.closing.wait_for(|closing| *closing).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.open.send_modify(|count| *count -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn all_closed_waits_for_every_guard() {
        let tunnels = std::sync::Arc::new(Tunnels::default());
        let first = tunnels.open();
        let second = tunnels.open();
        assert_eq!(tunnels.count(), 2);
        let waiter = tokio::spawn({
            let tunnels = tunnels.clone();
            async move { tunnels.all_closed().await }
        });

        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "one tunnel is still open");
        drop(second);
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("all tunnels closed")
            .unwrap();
    }

    #[tokio::test]
    async fn close_all_reaches_open_and_later_guards() {
        let tunnels = Tunnels::default();
        let mut before = tunnels.open();
        let pending = tokio::time::timeout(Duration::from_millis(100), before.closing()).await;
        assert!(pending.is_err(), "closing resolved before close_all");

        tunnels.close_all();
        let mut after = tunnels.open();
        tokio::time::timeout(Duration::from_secs(1), before.closing()).await.expect("open guard sees close_all");
        tokio::time::timeout(Duration::from_secs(1), after.closing()).await.expect("later guard sees close_all");
    }
}
