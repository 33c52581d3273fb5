//! The `gateway` binary: parse flags, load and validate configuration,
//! start logging and the runtime, run until SIGTERM/SIGINT (SIGHUP
//! reloads the certificates).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gateway::config::{LogFormat, Overrides};
use gateway::{Config, Gateway};

/// Secure WebSocket gateway in front of a length-delimited protobuf TCP backend.
///
/// Configuration comes from built-in defaults, then the TOML file, then
/// GATEWAY_<SECTION>__<KEY> environment variables, then these flags.
#[derive(Parser, Debug)]
#[command(version = VERSION, long_version = LONG_VERSION, about)]
struct Args {
    /// TOML configuration file (see deploy/gateway.example.toml).
    #[arg(long, short = 'c', env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print it, and exit (0 if valid).
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    overrides: Overrides,
}

/// The global allocator's name, as a literal for `concat!`.
#[cfg(feature = "jemalloc")]
macro_rules! allocator {
    () => {
        "jemalloc"
    };
}
#[cfg(not(feature = "jemalloc"))]
macro_rules! allocator {
    () => {
        "system"
    };
}

/// `-V`: the version and the commit.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("WSGW_BUILD_COMMIT"),
    ")"
);

/// `--version`: what the binary was built from (the same as the
/// `gateway.build.info` metric's attributes).
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("WSGW_BUILD_COMMIT"),
    "\nrustc: ",
    env!("WSGW_BUILD_RUSTC"),
    "\ntarget: ",
    env!("WSGW_BUILD_TARGET"),
    "\nprofile: ",
    env!("WSGW_BUILD_PROFILE"),
    "\nallocator: ",
    allocator!(),
);

/// jemalloc, not glibc's malloc: an idle session must not keep the memory
/// of a large message it once sent (issue 12). glibc raises its mmap
/// threshold to the size of every large block freed, so after the first
/// large message the next ones are carved from the heap among small
/// long-lived allocations, and their memory stays with the process:
/// 1,000 idle sessions that each once sent a 512 KiB message held about
/// 150 KiB each. Keeping glibc's threshold fixed instead gave the memory
/// back but made every large message an mmap of its own (2.1 times the
/// CPU per 512 KiB message, 20 times the page faults). jemalloc with a
/// background thread returns freed pages within about a second and reuses
/// them meanwhile: about 22 KiB each, and large messages cost what they
/// did. The figures are in BENCHMARKS.md (`loadtest/bench/memory.py`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (before `main`): a background
/// thread purges unused pages 1 s after they are freed (the default is
/// 10 s, and without the thread purging waits for later allocations).
/// `_RJEM_MALLOC_CONF` in the environment is applied on top.
// The one exception to the workspace's `unsafe_code` lint: jemalloc finds
// its options through this exported symbol (a NUL-terminated string that
// nothing writes), which Rust counts as unsafe.
#[cfg(feature = "jemalloc")]
#[allow(unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref(), &args.overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let warnings = config.warnings();
    if args.check_config {
        for w in &warnings {
            eprintln!("gateway: warning: {w}");
        }
        // Certificates are part of the configuration: load them too.
        if let Err(e) = config.check_files() {
            eprintln!("gateway: configuration error: {e}");
            return ExitCode::from(2);
        }
        println!("{config:#?}");
        eprintln!("gateway: configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    for w in &warnings {
        tracing::warn!("{w}");
    }
    raise_open_file_limit(config.listen.max_sessions);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Signal handlers first: a SIGTERM that arrives the moment the
        // gateway says it is listening must drain it, not kill it.
        let signals = match ShutdownSignals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("gateway: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let gw = match Gateway::start(config).await {
            Ok(gw) => gw,
            Err(e) => {
                eprintln!("gateway: {e}");
                return ExitCode::FAILURE;
            }
        };
        // One line per listener on stdout, for people and for scripts that
        // bind port 0.
        let a = gw.addrs().clone();
        for addr in &a.ws {
            println!("listening ws {addr}");
        }
        for addr in &a.wss {
            println!("listening wss {addr}");
        }
        if let Some(addr) = a.admin {
            println!("listening admin {addr}");
        }
        let reload = gw.tls_reload();
        gw.run_until(signals.recv(reload)).await;
        ExitCode::SUCCESS
    })
}

/// SIGTERM and SIGINT (shutdown) and SIGHUP (reload), registered before
/// the gateway starts: SIGHUP's default action would kill the process.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves at the first SIGTERM or SIGINT; every SIGHUP before it
    /// asks for a certificate reload.
    async fn recv(mut self, reload: Option<gateway::ReloadHandle>) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => match &reload {
                    Some(r) => {
                        tracing::info!("SIGHUP: reloading the tls certificates");
                        r.reload();
                    }
                    None => tracing::info!("SIGHUP: no wss listener, nothing to reload"),
                },
            }
        }
    }
}

/// Each session is one descriptor: raise the soft open-file limit to the
/// hard one (containers often start at 1,024), and say so if even that is
/// below `listen.max_sessions` and a margin.
fn raise_open_file_limit(max_sessions: usize) {
    const MARGIN: u64 = 256;
    let want = max_sessions as u64 + MARGIN;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < want => tracing::warn!(
            limit = n,
            max_sessions,
            "the open-file limit is below listen.max_sessions + {MARGIN}: sessions past it \
             will be refused (raise LimitNOFILE, or docker run --ulimit nofile=...)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}
