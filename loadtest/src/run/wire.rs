//! Sending and receiving load-test messages on one connection.

use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use tokio::sync::Mutex;

use super::conn::{self, Ws};
use super::payload::{self, Stamp};
use super::stats::ErrorKind;
use super::Shared;

/// How a connection's run ended early.
#[derive(Debug)]
pub(super) enum End {
    Closed(u16),
    Disconnected,
    Timeout,
    Corrupt,
}

impl End {
    pub(super) fn kind(&self) -> ErrorKind {
        match self {
            End::Closed(_) => ErrorKind::CloseCode,
            End::Disconnected => ErrorKind::Disconnected,
            End::Timeout => ErrorKind::Timeout,
            End::Corrupt => ErrorKind::Corrupt,
        }
    }
}

pub(super) type Reader = fastwebsockets::WebSocketRead<tokio::io::ReadHalf<conn::Io>>;
pub(super) type Writer = Arc<Mutex<fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<conn::Io>>>>;

pub(super) fn split(ws: Ws) -> (Reader, Writer) {
    let (r, w) = ws.split(tokio::io::split);
    (r, Arc::new(Mutex::new(w)))
}

/// Reads the next data message (answering pings and closes on the way).
pub(super) async fn recv(
    r: &mut Reader,
    w: &Writer,
    timeout: Duration,
) -> Result<(Vec<u8>, bool), End> {
    recv_or_pong(r, w, timeout, false)
        .await
        .map(|m| m.unwrap_or_default())
}

/// Like [`recv`]; with `pong`, a pong frame returns `None`.
pub(super) async fn recv_or_pong(
    r: &mut Reader,
    w: &Writer,
    timeout: Duration,
    pong: bool,
) -> Result<Option<(Vec<u8>, bool)>, End> {
    let send = |f: Frame<'static>| {
        let w = w.clone();
        async move {
            let mut w = w.lock().await;
            w.write_frame(f).await?;
            w.flush().await
        }
    };
    let mut send = send;
    let read = async {
        loop {
            let f = r
                .read_frame::<_, WebSocketError>(&mut send)
                .await
                .map_err(|_| End::Disconnected)?;
            match f.opcode {
                OpCode::Binary | OpCode::Text => {
                    if !f.fin {
                        // The gateway sends whole messages; fragments from a
                        // peer bridge are reassembled here.
                        let text = f.opcode == OpCode::Text;
                        let mut buf = f.payload.to_vec();
                        loop {
                            let c = r
                                .read_frame::<_, WebSocketError>(&mut send)
                                .await
                                .map_err(|_| End::Disconnected)?;
                            if c.opcode == OpCode::Continuation {
                                buf.extend_from_slice(&c.payload);
                                if c.fin {
                                    return Ok(Some((buf, text)));
                                }
                            }
                        }
                    }
                    return Ok(Some((f.payload.to_vec(), f.opcode == OpCode::Text)));
                }
                OpCode::Close => {
                    let p = &f.payload;
                    let code = if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        1005
                    };
                    return Err(End::Closed(code));
                }
                OpCode::Pong if pong => return Ok(None),
                _ => {}
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| End::Timeout)?
}

pub(super) async fn send(
    w: &Writer,
    i: u32,
    seq: u64,
    t: Duration,
    sh: &Shared,
    buf: &mut Vec<u8>,
) -> Result<(), End> {
    send_raw(w, i, seq, t, SendCtx::of(sh), buf).await
}

pub(super) fn check(
    msg: &[u8],
    text: bool,
    i: u32,
    expected: u64,
    sh: &Shared,
) -> Result<Stamp, End> {
    if text != sh.args.text {
        return Err(End::Corrupt);
    }
    payload::verify(msg, i, expected, sh.args.size, sh.args.text).map_err(|_| End::Corrupt)
}

/// What a sender needs to build messages.
#[derive(Clone, Copy)]
pub(super) struct SendCtx {
    pub(super) size: usize,
    pub(super) text: bool,
}

impl SendCtx {
    pub(super) fn of(sh: &Shared) -> Self {
        Self {
            size: sh.args.size,
            text: sh.args.text,
        }
    }
}

pub(super) async fn send_raw(
    w: &Writer,
    i: u32,
    seq: u64,
    t: Duration,
    ctx: SendCtx,
    buf: &mut Vec<u8>,
) -> Result<(), End> {
    let stamp = Stamp {
        conn: i,
        seq,
        t_ns: u64::try_from(t.as_nanos()).unwrap_or(u64::MAX),
    };
    payload::encode(stamp, ctx.size, ctx.text, buf);
    let frame = if ctx.text {
        Frame::text(Payload::BorrowedMut(buf))
    } else {
        Frame::binary(Payload::BorrowedMut(buf))
    };
    let mut w = w.lock().await;
    w.write_frame(frame).await.map_err(|_| End::Disconnected)?;
    w.flush().await.map_err(|_| End::Disconnected)
}
