//! One client connection of a session: the WebSocket halves, what the
//! event loop tracks about the client, and the frame reader.
//!
//! fastwebsockets' `read_frame` is not cancel-safe, so the read future owns
//! the read half and is kept across loop iterations (`read.set(..)` starts
//! the next read only after one completed); it is never dropped midway
//! except when the connection is torn down.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use fastwebsockets::{
    Frame as WsFrame, OpCode, Payload, Role, WebSocketError, WebSocketRead, WebSocketWrite,
};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::time::Instant;

use super::assemble::Assembler;
use super::Io;

pub(super) type Reader<'a> = WebSocketRead<ReadCap<&'a mut ReadHalf<Io>>>;

/// The most one read from a client takes from its socket.
const MAX_READ: usize = 64 * 1024;

/// Caps every read at [`MAX_READ`]. fastwebsockets reads into all the spare
/// room of its buffer, and that buffer doubles whenever its unread tail
/// outgrows what was consumed: against a client that sends flat out, its
/// read-ahead grew to megabytes per connection (a stuck backend measured
/// 1.5 to 2 times `link_queue_bytes` in the gateway). With reads capped,
/// what a connection holds beyond the frame being read stays near 64 KiB;
/// the rest waits in the kernel, which is also what pauses the client.
pub(super) struct ReadCap<R>(R);

impl<R: AsyncRead + Unpin> AsyncRead for ReadCap<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if buf.remaining() <= MAX_READ {
            // The common case (small messages, a buffer of a few KiB):
            // nothing to cap.
            return Pin::new(&mut self.0).poll_read(cx, buf);
        }
        let max = MAX_READ;
        // Initialised first (a memset of at most 64 KiB, only when the
        // buffer has grown past that), so that marking the bytes read as
        // filled needs no unsafe code.
        buf.initialize_unfilled_to(max);
        let mut part = buf.take(max);
        let res = Pin::new(&mut self.0).poll_read(cx, &mut part);
        let n = part.filled().len();
        if let Poll::Ready(Ok(())) = res {
            buf.advance(n);
        }
        res
    }
}
pub(super) type Writer = WebSocketWrite<WriteHalf<Io>>;

/// One complete frame from the client, with its payload owned.
pub(super) struct ClientFrame {
    pub(super) fin: bool,
    pub(super) opcode: OpCode,
    pub(super) payload: BytesMut,
}

/// Why no frame came from the client.
pub(super) enum ReadError {
    /// What fastwebsockets found: a protocol violation it checks (reserved
    /// bits, unknown opcode, a fragmented or oversized ping, a frame over
    /// the size limit, invalid UTF-8), or the stream failing.
    Ws(WebSocketError),
    /// RFC 6455 5.1: "The server MUST close the connection upon receiving
    /// a frame that is not masked." fastwebsockets does not check this.
    Unmasked,
}

/// The per-connection state of the event loop.
pub(super) struct Connection {
    pub(super) writer: Writer,
    pub(super) assembler: Assembler,
    /// False once nothing more can be read (the client closed, or its
    /// stream failed).
    pub(super) reading: bool,
    /// When the client last showed a sign of life.
    pub(super) last_heard: Instant,
    /// A ping is out and unanswered.
    pub(super) ping_sent: bool,
}

/// Reads the next frame; gives the reader back with it. (A function
/// returning an `async move` block, not an `async fn`: an async function
/// would keep the reader twice, as its argument and as the local it moves
/// to, in a future that is part of every session's loop.)
#[allow(clippy::manual_async_fn)]
pub(super) fn read_frame(
    mut reader: Reader<'_>,
) -> impl Future<Output = (Reader<'_>, Result<ClientFrame, ReadError>)> {
    async move {
        // With auto-close and auto-pong off, fastwebsockets never asks us to
        // send anything from inside `read_frame`.
        let res = reader
            .read_frame(&mut |_| async { Ok::<(), WebSocketError>(()) })
            .await
            .map_err(ReadError::Ws)
            .and_then(|mut f| {
                if !is_masked(&mut f) {
                    return Err(ReadError::Unmasked);
                }
                Ok(ClientFrame {
                    fin: f.fin,
                    opcode: f.opcode,
                    payload: match f.payload {
                        Payload::Bytes(b) => b,
                        other => BytesMut::from(&other[..]),
                    },
                })
            });
        (reader, res)
    }
}

/// Whether the client masked the frame. fastwebsockets keeps the masking
/// key private (it unmasks in place and leaves the key set); the header it
/// would write for the frame is the one public view of it: the MASK bit is
/// the top bit of the second byte. 14 bytes is the longest header (10 of
/// length, 4 of key), so `fmt_head` cannot run out of room.
fn is_masked(frame: &mut WsFrame<'_>) -> bool {
    let mut head = [0u8; 14];
    frame.fmt_head(&mut head);
    head[1] & 0x80 != 0
}

impl Connection {
    /// Splits an upgraded connection: the frame reader (borrowing the raw
    /// read half, which stays the caller's for lingering) and the rest.
    pub(super) fn new<'r>(
        raw_read: &'r mut ReadHalf<Io>,
        raw_write: WriteHalf<Io>,
        max_message: usize,
    ) -> (Reader<'r>, Self) {
        let (mut reader, mut writer) =
            fastwebsockets::after_handshake_split(ReadCap(raw_read), raw_write, Role::Server);
        // The gateway answers pings and closes itself: it must see them to
        // keep liveness and to map closes through its table.
        reader.set_auto_close(false);
        reader.set_auto_pong(false);
        // fastwebsockets refuses frames of `>= limit` bytes.
        reader.set_max_message_size(max_message.saturating_add(1));
        writer.set_auto_apply_mask(false);
        let conn = Self {
            writer,
            assembler: Assembler::default(),
            reading: true,
            last_heard: Instant::now(),
            ping_sent: false,
        };
        (reader, conn)
    }

    /// Writes one frame and flushes, within `limit`.
    pub(super) async fn write_flush(
        &mut self,
        frame: WsFrame<'_>,
        limit: Duration,
    ) -> Result<(), Option<WebSocketError>> {
        let write = async {
            self.writer.write_frame(frame).await?;
            self.writer.flush().await
        };
        match Box::pin(tokio::time::timeout(limit, write)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Some(e)),
            Err(_) => Err(None),
        }
    }
}

/// Reads and discards what the client still sends, until it closes or
/// `limit` passes; memory use is one small buffer.
pub(super) async fn linger(rd: &mut ReadHalf<Io>, limit: Duration) {
    let mut sink = [0u8; 4096];
    let drain = async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(limit, drain).await;
}
