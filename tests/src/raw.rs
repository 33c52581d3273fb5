//! A deliberately low-level WebSocket client over plain TCP, for tests that
//! must cut a connection at an exact byte (in the middle of a frame) or
//! send what a well-behaved library never would; and [`http_head`] for
//! requests sent byte for byte.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest a test waits for an HTTP answer before calling it a hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// A valid upgrade request for `path` (the example of RFC 6455 section
/// 1.2), with `extra` header lines (each ending in CRLF) before the blank
/// line.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends `request` as is and returns the status and the response head
/// (status line and headers, all lower-cased) once it arrived.
pub async fn http_head(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head = tokio::time::timeout(ANSWER_WITHIN, async {
        loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break String::from_utf8_lossy(&buf[..i]).to_lowercase();
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before a response: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("no HTTP answer (a hang)");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    (status, head)
}

/// A raw client connection after the upgrade.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    /// Response headers of the upgrade, names in lower case.
    pub headers: Vec<(String, String)>,
}

/// A data message from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Data(Vec<u8>),
    Close(u16),
}

impl Raw {
    /// Connects and upgrades; `Err(status)` if the server refused.
    pub async fn connect(
        addr: std::net::SocketAddr,
        headers: &[(&str, String)],
    ) -> Result<Self, u16> {
        let mut stream = TcpStream::connect(addr).await.map_err(|_| 0u16)?;
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let req = upgrade_request("/ws", &extra);
        stream.write_all(req.as_bytes()).await.map_err(|_| 0u16)?;
        let mut buf = BytesMut::with_capacity(4096);
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if stream.read_buf(&mut buf).await.map_err(|_| 0u16)? == 0 {
                return Err(0);
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.advance(end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if status != 101 {
            return Err(status);
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Ok(Self {
            stream,
            buf,
            headers,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A masked binary frame carrying `payload`.
    pub fn encode(payload: &[u8]) -> Vec<u8> {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut f = vec![0x82];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Writes raw bytes (a whole frame, or part of one).
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next data message or close, waiting at most `limit`; `Ok(None)`
    /// on timeout. Cancel-safe: partial input stays buffered.
    pub async fn next(&mut self, limit: Duration) -> std::io::Result<Option<Frame>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(f) = self.parse() {
                match f {
                    (0x9, p) => {
                        // Answer pings with a masked pong.
                        let mut pong = Self::encode(&p);
                        pong[0] = 0x8a;
                        self.stream.write_all(&pong).await?;
                    }
                    (0x8, p) => {
                        let code = if p.len() >= 2 {
                            u16::from_be_bytes([p[0], p[1]])
                        } else {
                            1005
                        };
                        return Ok(Some(Frame::Close(code)));
                    }
                    (0x1 | 0x2, p) => return Ok(Some(Frame::Data(p))),
                    _ => {}
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// One complete unmasked server frame from the buffer, if there is one.
    fn parse(&mut self) -> Option<(u8, Vec<u8>)> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let (len, head) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if b.len() < head + len {
            return None;
        }
        self.buf.advance(head);
        let payload = self.buf.split_to(len).to_vec();
        Some((opcode, payload))
    }
}
