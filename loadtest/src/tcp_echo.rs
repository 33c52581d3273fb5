//! A raw TCP echo server: the backend that WebSocket-to-TCP bridges
//! (websocat, websockify) are compared against in the benchmark.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Echoes every byte on every connection, forever.
pub async fn serve(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (mut s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}
