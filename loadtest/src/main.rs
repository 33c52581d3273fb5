//! `loadtest`: the gateway's reference backend and development tools.
// No unsafe code here: only the gateway binary has one documented exception
// (jemalloc's options in gateway/src/main.rs), so the workspace lint is deny.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use loadtest::backend::{self, Mode};
use protocol::Framing;

/// Load generator and reference backend for the wss gateway.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the reference backend (strict, echo or push).
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// echo: send every data frame back to its session; push: also push
        /// --push-rate messages per second to every session.
        #[arg(long, value_enum, default_value = "echo")]
        mode: Mode,
        /// Length prefix: varint or u32be (must match the gateway).
        #[arg(long, default_value = "varint")]
        framing: Framing,
        /// Largest frame body accepted or sent, in bytes.
        #[arg(long, default_value_t = (1 << 20) + 4096)]
        max_frame: usize,
        /// Push mode: messages per second to each session.
        #[arg(long, default_value_t = 10)]
        push_rate: u32,
        /// Push mode: payload bytes per message (min 16: sequence, timestamp).
        #[arg(long, default_value_t = 64)]
        push_size: usize,
        /// Highest link protocol version to accept (1, 2 or 3).
        #[arg(long, default_value_t = protocol::PROTOCOL_VERSION)]
        max_version: u32,
        /// Version 3 capabilities to adopt when offered:
        /// "flow,move,fleet", "flow,move", "flow", or "none".
        #[arg(long, default_value = "flow,move,fleet")]
        caps: String,
        /// The window granted to each session, in bytes (0: the gateway's
        /// own, `hello.session_window`).
        #[arg(long, default_value_t = 0)]
        window: u64,
    },
    /// Generate load against a gateway (or any WebSocket echo service).
    Run(loadtest::run::RunArgs),
    /// A reconnect storm: clients connect, then all drop and reconnect at
    /// once, while established sessions measure their round trips.
    Storm(loadtest::storm::StormArgs),
    /// A raw TCP echo server (what bridges like websocat are measured
    /// against).
    TcpEcho {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
    },
    /// A bare WebSocket echo server (wss with --tls-cert and --tls-key):
    /// the same TLS, upgrade and WebSocket crates as the gateway and
    /// nothing else, the floor the gateway's CPU is compared with.
    BareEcho {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9200")]
        listen: SocketAddr,
        /// PEM certificate chain (wss).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key (wss).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Relay instead of echoing: each message goes to the byte echo
        /// (a `tcp-echo`) at this address and back first. The smallest
        /// relay: what relaying costs over the floor, without the
        /// gateway's sessions.
        #[arg(long)]
        relay: Option<SocketAddr>,
        /// With --relay: a TCP connection per WebSocket connection (`own`,
        /// websocat's shape), or two shared by all (`shared`, the
        /// gateway's shape: a writer and a reader task per link), or
        /// shared with the readers writing the answers to the clients
        /// (`direct`; binary messages only, pings not answered).
        #[arg(long, value_enum, default_value = "own", requires = "relay")]
        shape: loadtest::bare_echo::Shape,
    },
    /// Write a development CA and a localhost certificate signed by it
    /// (ca.pem, cert.pem, key.pem).
    Devcert {
        /// Output directory.
        #[arg(long, default_value = "target/devcert")]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Run(run) => loadtest::run::main(run),
        Command::Storm(storm) => loadtest::storm::main(storm),
        Command::TcpEcho { listen } => serve_on(listen, loadtest::tcp_echo::serve),
        Command::BareEcho {
            listen,
            tls_cert,
            tls_key,
            relay,
            shape,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(c), Some(k)) => Some(loadtest::bare_echo::acceptor(&c, &k)?),
                _ => None,
            };
            serve_on(listen, move |l| {
                loadtest::bare_echo::serve(l, tls, relay.map(|a| (a, shape)))
            })
        }
        Command::Devcert { out } => {
            loadtest::devcert::generate(&["localhost", "127.0.0.1", "::1"])?.write_to(&out)?;
            println!(
                "wrote {}/{{ca,cert,key}}.pem (trust ca.pem in clients)",
                out.display()
            );
            Ok(())
        }
        Command::Backend {
            listen,
            mode,
            framing,
            max_frame,
            push_rate,
            push_size,
            max_version,
            caps,
            window,
        } => serve_on(listen, move |listener| async move {
            let caps = caps
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty() && *c != "none")
                .map(str::to_owned)
                .collect();
            let opts = backend::Options {
                mode,
                framing,
                max_frame,
                push_rate,
                push_size,
                max_version,
                caps,
                window,
            };
            let stats = Arc::new(backend::Stats::default());
            backend::serve(listener, opts, stats).await
        }),
    }
}

/// Binds `listen`, prints `listening ADDR` (scripts and tests read it),
/// and serves with `f` until it ends or Ctrl-C.
fn serve_on<F, Fut>(listen: SocketAddr, f: F) -> anyhow::Result<()>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("listening {}", listener.local_addr()?);
        tokio::select! {
            r = f(listener) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
