//! A link driver fed bytes by a fuzz target (see `crate::fuzzing`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use protocol::{Body, FrameCodec, SessionId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::flow::Caps;
use super::{Gone, LinkDriver, LinkError, LinkHandle, LinkSettings, MailboxLimits, ToClient};
use crate::metrics::Metrics;

/// What one link run did with the backend's bytes.
#[derive(Debug)]
pub struct LinkRun {
    /// How the link ended.
    pub end: LinkEnd,
    /// Per registered session, in registration order: what reached its
    /// mailbox, in order, and why its route went.
    pub sessions: Vec<SessionRun>,
    /// Nonces of the heartbeat answers the gateway wrote, in order.
    pub answered: Vec<u64>,
}

/// How a link ended.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEnd {
    /// The backend closed the connection.
    Eof,
    /// Undecodable bytes (framing, or a frame with no session).
    Decode,
    /// A frame the backend must not send.
    Protocol,
    /// Anything else (I/O, heartbeat timeout, shutdown).
    Other(String),
}

/// One session's side of a link run.
#[derive(Debug)]
pub struct SessionRun {
    /// The session's id.
    pub id: u64,
    /// Messages in its mailbox, in order.
    pub delivered: Vec<Delivered>,
    /// Why its route went: `"backend_closed"`, `"slow_consumer"` or
    /// `"link_lost"`.
    pub gone: &'static str,
}

/// One message a session's mailbox received.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Data for the client.
    Data(Vec<u8>, bool),
    /// The backend's close.
    Close(u32, String),
    /// The session ends as the backend broke the contract for it.
    Invalid,
}

fn metrics() -> Arc<Metrics> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    METRICS
        .get_or_init(|| match Metrics::standalone() {
            Ok(m) => Arc::new(m),
            Err(e) => panic!("metrics: {e}"),
        })
        .clone()
}

/// Runs a link driver over an in-memory stream with `sessions`
/// registered (with flow control and a window of `window` bytes when
/// `flow`), writes `chunks` as the backend, then closes the backend's side.
pub async fn run_link(
    codec: FrameCodec,
    flow: bool,
    window: u64,
    sessions: &[u64],
    chunks: &[&[u8]],
) -> LinkRun {
    let settings = LinkSettings {
        codec,
        heartbeat_interval: Duration::from_secs(3600),
        heartbeat_timeout: Duration::from_secs(7200),
        queue_frames: 16,
        queue_bytes: 1 << 20,
        // Large enough that nothing the fuzzer sends fills a mailbox.
        mailbox: MailboxLimits {
            bytes: 64 << 20,
            drain_within: Duration::from_secs(3600),
        },
        session_window: window,
    };
    let caps = Caps {
        flow,
        moves: false,
        fleet: false,
        backend_window: window,
    };
    let (gateway_end, mut backend_end) = tokio::io::duplex(1 << 20);
    let (handle, queues) = LinkHandle::new(0, 3, caps, &settings);
    let mut mailboxes = Vec::new();
    for &id in sessions {
        if let Ok(m) = handle.register(SessionId(id)) {
            mailboxes.push((id, m));
        }
    }
    let driver = LinkDriver {
        stream: gateway_end,
        leftover: BytesMut::new(),
        queues,
        settings,
        metrics: metrics(),
        handle,
        endpoint: "fuzz".to_owned(),
    };
    let backend = async move {
        for chunk in chunks {
            if backend_end.write_all(chunk).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let _ = backend_end.shutdown().await;
        backend_end
    };
    let (end, mut backend_end) = tokio::join!(driver.run(CancellationToken::new()), backend);
    let end = match end {
        LinkError::Eof => LinkEnd::Eof,
        LinkError::Decode(_) => LinkEnd::Decode,
        LinkError::Protocol(_) => LinkEnd::Protocol,
        other => LinkEnd::Other(other.to_string()),
    };
    let mut written = BytesMut::new();
    let _ = backend_end.read_buf(&mut written).await;
    while backend_end.read_buf(&mut written).await.unwrap_or(0) > 0 {}
    let mut answered = Vec::new();
    while let Ok(Some(f)) = codec.decode(&mut written) {
        if let Some(Body::Heartbeat(hb)) = f.body {
            if hb.ack {
                answered.push(hb.nonce);
            }
        }
    }
    let mut runs = Vec::new();
    for (id, mut m) in mailboxes {
        let gone = match m.eviction.wait().await {
            Gone::BackendClosed => "backend_closed",
            Gone::SlowConsumer => "slow_consumer",
            Gone::LinkLost => "link_lost",
        };
        let mut delivered = Vec::new();
        while let Some(msg) = m.queue.try_recv() {
            delivered.push(match msg {
                ToClient::Data { payload, text, .. } => Delivered::Data(payload.to_vec(), text),
                ToClient::Close { code, reason } => Delivered::Close(code, reason),
                ToClient::Invalid { .. } => Delivered::Invalid,
            });
        }
        runs.push(SessionRun {
            id,
            delivered,
            gone,
        });
    }
    LinkRun {
        end,
        sessions: runs,
        answered,
    }
}
