//! What listeners, upgrades and sessions share.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::backend::Pool;
use crate::metrics::Metrics;
use crate::resume;
use crate::settings::{ListenSettings, ResumeSettings, SessionSettings};
use crate::shutdown::Shutdown;

/// State shared by listeners, upgrades and sessions.
///
/// # Concurrency
/// Read-only after start-up except for its own synchronised parts: the
/// admission and handshake semaphores, the pool (see [`Pool`]), metrics (atomic
/// instruments), the shutdown (tokens and trackers), the resume registry
/// (a mutex taken per resumable session start, resume and end) and the
/// detached budget (atomics).
pub(crate) struct Shared {
    pub(crate) listen: ListenSettings,
    pub(crate) session: SessionSettings,
    pub(crate) resume: ResumeSettings,
    pub(crate) metrics: Arc<Metrics>,
    /// The providers behind the metrics, and the session tracer.
    pub(crate) telemetry: crate::telemetry::Telemetry,
    pub(crate) pool: Arc<Pool>,
    /// One permit per session, up to `listen.max_sessions`.
    pub(crate) admission: Arc<Semaphore>,
    /// One permit per TLS handshake in progress, up to
    /// `listen.max_handshakes`.
    pub(crate) handshakes: Semaphore,
    pub(crate) shutdown: Shutdown,
    /// Resumable sessions by credential.
    pub(crate) resumable: resume::Registry,
    /// Gateway-wide accounting of detached sessions.
    pub(crate) detached: resume::DetachedBudget,
    /// This instance's fleet, if `fleet.redis_url` is set.
    pub(crate) fleet: Option<Arc<crate::fleet::Fleet>>,
}
