//! The gateway's shutdown: every task it spawns, and the order in which they
//! stop.
//!
//! Every spawn goes through [`Shutdown`] (the workspace's `clippy.toml`
//! forbids `tokio::spawn` in the gateway), so that shutdown can wait for
//! every task, including upgraded connections that hyper no longer tracks.
//!
//! The phases, in order ([`Shutdown::run`]):
//!
//! 1. **Stop accepting.** Listeners stop; new upgrades get 503; `/readyz`
//!    says 503.
//! 2. **Drain sessions.** Every session closes its client with 1001 and
//!    tells the backend; connections still before their upgrade end. Up to
//!    `shutdown.drain_timeout`.
//! 3. **Flush links.** The link drivers write what is queued (the sessions'
//!    closes) and close their sockets. Up to [`LINK_FLUSH_DEADLINE`].
//! 4. **Stop the admin listener.**

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Phase 3's bound: how long the links get, after the sessions are gone, to
/// write what is already queued. Only frames already queued are written,
/// so on a healthy link this takes one write; the bound matters only for a
/// backend that stopped reading.
pub(crate) const LINK_FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// One group of tasks that stop together.
struct Phase {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Phase {
    fn new() -> Self {
        Self {
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Fires `stop`; the group takes no new task.
    fn begin(&self) {
        self.stop.cancel();
        self.tasks.close();
    }

    /// Waits up to `limit` for the tasks; returns how many were still
    /// running at the deadline.
    async fn wait(&self, limit: Duration) -> usize {
        match tokio::time::timeout(limit, self.tasks.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tasks.len(),
        }
    }
}

/// What sessions wait on to close on a drain: the wake-up, and a flag set
/// before it. Polling a `Notify`'s waiter takes that `Notify`'s lock, which
/// every session shares; a session polled for another reason (a message)
/// reads the flag instead (see `session/signals.rs`, issue 12).
#[derive(Clone, Default)]
pub(crate) struct DrainSignal {
    /// Woken once, when the drain begins.
    pub(crate) notify: Arc<Notify>,
    /// Set just before `notify` wakes its waiters.
    pub(crate) begun: Arc<AtomicBool>,
}

impl DrainSignal {
    /// Begins the drain: the flag first, then the wake-up.
    pub(crate) fn fire(&self) {
        self.begun.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// The cancellation, the task trackers and the phase order.
///
/// # Concurrency
/// Shared by every task through `Arc<Shared>`; its parts are synchronised
/// themselves (cancellation tokens, task trackers, the drain's `Notify`
/// and flag).
pub(crate) struct Shutdown {
    /// Listeners, connections before their upgrade, and sessions.
    sessions: Phase,
    /// Wakes every session at once (sessions wait on this rather than on a
    /// cancellation token, whose every poll takes a lock).
    drain: DrainSignal,
    /// Link supervisors and drivers.
    links: Phase,
    /// The admin listener and its connections.
    admin: Phase,
}

impl Shutdown {
    pub(crate) fn new() -> Self {
        Self {
            sessions: Phase::new(),
            drain: DrainSignal::default(),
            links: Phase::new(),
            admin: Phase::new(),
        }
    }

    /// Spawns a listener, connection or session task.
    pub(crate) fn spawn_session<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.sessions.tasks.spawn(task);
    }

    /// Spawns a link supervisor.
    pub(crate) fn spawn_link<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.links.tasks.spawn(task);
    }

    /// Spawns an admin listener task, or another operator-facing task
    /// that runs until the very end (the certificate reloader).
    pub(crate) fn spawn_admin<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.admin.tasks.spawn(task);
    }

    /// Whether phase 1 has begun: no new sessions. (The drain's flag, which
    /// is set with the token and, unlike it, read without a lock.)
    pub(crate) fn is_draining(&self) -> bool {
        self.drain.begun.load(Ordering::Acquire)
    }

    /// Resolves when phase 1 begins (for accept loops).
    pub(crate) async fn draining(&self) {
        self.sessions.stop.cancelled().await;
    }

    /// What sessions wait on to close with 1001.
    pub(crate) fn drain_signal(&self) -> DrainSignal {
        self.drain.clone()
    }

    /// Fires when the links must flush and close (phase 3).
    pub(crate) fn links_stop(&self) -> CancellationToken {
        self.links.stop.clone()
    }

    /// Fires when the admin listener must stop (phase 4).
    pub(crate) fn admin_stop(&self) -> CancellationToken {
        self.admin.stop.clone()
    }

    /// Runs the phases in order; see the module documentation.
    pub(crate) async fn run(&self, drain_timeout: Duration) {
        info!(?drain_timeout, "shutting down: closing sessions");
        // The token and the flag first, so that a session starting now sees
        // them; then the wake-up for every session already waiting.
        self.sessions.begin();
        self.drain.fire();
        let remaining = self.sessions.wait(drain_timeout).await;
        if remaining > 0 {
            warn!(
                remaining,
                "drain deadline passed; dropping the remaining connections"
            );
        }
        self.links.begin();
        if self.links.wait(LINK_FLUSH_DEADLINE).await > 0 {
            warn!("links did not flush within {LINK_FLUSH_DEADLINE:?}");
        }
        self.admin.begin();
        info!("stopped");
    }
}
