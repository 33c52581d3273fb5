//! A TCP proxy that injects link faults between the gateway and a backend:
//! it forwards every connection both ways and, on demand, resets all of
//! them at once (SO_LINGER 0, so each side gets a TCP RST, as from a load
//! balancer dropping its flows or a backend host crashing).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; dropped, it stops accepting (connections already
/// forwarded go on until either side closes).
pub struct ResetProxy {
    pub addr: SocketAddr,
    resets: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ResetProxy {
    /// Listens on 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (resets, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let (tx, count) = (resets.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let mut reset = tx.subscribe();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let (mut down, mut up) = (down, up);
                    reset.mark_unchanged();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = reset.changed() => {
                            // Closing with a zero linger sends RST, not FIN.
                            for s in [&down, &up] {
                                let _ = s.set_zero_linger();
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            resets,
            accepted,
            task,
        }
    }

    /// Resets every connection forwarded so far.
    pub fn reset_all(&self) {
        self.resets.send_modify(|n| *n += 1);
    }

    /// Connections accepted so far (the gateway's link attempts).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for ResetProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
