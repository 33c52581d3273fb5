//! Stage 5: the backend side. A pool of links, each one TCP connection to a
//! backend endpoint multiplexing many sessions.
//!
//! Read in this order:
//!
//! 1. [`link`]: [`LinkHandle`], the cheap clonable side a session holds. A
//!    session sends a frame with one call (`try_send`, `send`,
//!    `send_within`); the link's byte budget and frame queue bound what
//!    waits for the socket.
//! 2. [`driver`]: [`LinkDriver`], the one task that owns the socket. Its
//!    writer batches queued frames into one write; its reader decodes
//!    backend frames and hands each to its session's [`Mailbox`].
//! 3. [`mailbox`]: a session's receiving end, bounded by bytes,
//!    and the eviction signal the reader raises when it takes the session
//!    off the link.
//! 4. [`handshake`]: `Hello` / `HelloAck`, before the driver starts.
//! 5. [`pool`]: the links to every endpoint, their supervisors (connect,
//!    handshake, run, reconnect with backoff) and placement of new sessions.

use std::time::Duration;

use protocol::FrameCodec;

mod chan;
mod driver;
pub(crate) mod flow;
pub(crate) mod fuzzing;
mod handshake;
mod link;
mod mailbox;
mod pool;

pub(crate) use driver::LinkDriver;
pub(crate) use flow::Flow;
pub(crate) use link::{LinkGone, LinkHandle, TrySend};
pub(crate) use mailbox::{Eviction, Gone, Mailbox, MailboxLimits, Queue, ToClient};
pub(crate) use pool::{backoff, Lease, Pool, PoolSettings};

/// How long a frame that only informs the backend (a session's close after
/// its client left, `detached`, `attached`, a client message accepted just
/// before the session ended) may wait for room on a full link. Past it the
/// frame is dropped: a stuck link must not hold a session's end, and the
/// backend learns of a lost link by itself.
pub(crate) const ADVISORY_SEND_DEADLINE: Duration = Duration::from_secs(1);

/// What a message queued towards a client costs of its session's byte bound
/// besides its payload: its queue slot (a `ToClient`) and the allocator's
/// header of its payload (checked by a test). With it a bound on bytes is a
/// bound on memory, also for tiny messages.
pub(crate) const QUEUED_OVERHEAD: usize = 64;

/// The same for a frame queued towards a link: its slot (a `Frame` and its
/// cost) and its payload's allocator header (checked by a test).
pub(crate) const QUEUED_FRAME_OVERHEAD: usize = 192;

/// A queue that already holds this many entries is backing up: what joins
/// it now will wait, so its payload is copied out of the shared read buffer
/// it came in (`Frame::compact`) rather than keep that buffer alive.
pub(crate) const BACKING_UP_DEPTH: usize = 4;

#[cfg(test)]
mod overhead_tests {
    use super::*;

    /// The overheads cover what a queued entry holds besides its payload:
    /// its slot and a 16-byte allocator header.
    #[test]
    fn queued_overheads_cover_the_queue_slots() {
        assert!(std::mem::size_of::<ToClient>() + 16 <= QUEUED_OVERHEAD);
        let outbound = std::mem::size_of::<driver::Outbound>();
        assert!(
            outbound + 16 <= QUEUED_FRAME_OVERHEAD,
            "Outbound is {outbound} bytes; Hello {}, Open {}, HelloAck {}",
            std::mem::size_of::<protocol::pb::Hello>(),
            std::mem::size_of::<protocol::pb::SessionOpen>(),
            std::mem::size_of::<protocol::pb::HelloAck>(),
        );
    }
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    /// TCP connect failed or timed out.
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    /// The backend did not answer `Hello` properly.
    #[error("handshake failed: {0}")]
    Handshake(#[from] handshake::HandshakeError),
    /// Reading or writing the socket failed.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    /// The backend closed the connection.
    #[error("backend closed the link")]
    Eof,
    /// Nothing arrived for `backend.heartbeat_timeout`.
    #[error("no data from the backend for {0:?} (heartbeat timeout)")]
    HeartbeatTimeout(Duration),
    /// The backend's bytes are not valid frames.
    #[error("undecodable frame: {0}")]
    Decode(#[from] protocol::DecodeError),
    /// A valid frame that the backend must not send.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The gateway is shutting down.
    #[error("gateway shutting down")]
    Shutdown,
}

/// Settings of one link.
#[derive(Debug, Clone)]
pub(crate) struct LinkSettings {
    /// Framing and the largest frame either side may send.
    pub(crate) codec: FrameCodec,
    /// Period of the gateway's heartbeat.
    pub(crate) heartbeat_interval: Duration,
    /// A link from which nothing arrives for this long is dead.
    pub(crate) heartbeat_timeout: Duration,
    /// Frames queued towards the backend before senders wait.
    pub(crate) queue_frames: usize,
    /// Bytes queued towards the backend (wire length + [`QUEUED_FRAME_OVERHEAD`]
    /// per frame) before senders wait.
    pub(crate) queue_bytes: usize,
    /// Bounds of each session's mailbox.
    pub(crate) mailbox: MailboxLimits,
    /// The window the gateway grants each session (`Hello.session_window`).
    pub(crate) session_window: u64,
}
