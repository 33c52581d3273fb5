//! The certificates the wss listeners serve: chosen per handshake by the
//! client's SNI, and replaced whole, without a dropped session, when their
//! files change or on SIGHUP.
//!
//! A reload builds a complete new [`CertSet`] from every configured pair
//! and swaps it in; handshakes already past certificate selection and
//! established connections keep what they have (a TLS connection never
//! looks at the certificate again), new handshakes get the new set. A pair
//! that cannot be loaded fails the whole reload: the previous set stays,
//! one error line is logged and `gateway.tls.reloads{result="failed"}`
//! counts it. The same bad files are not tried again until they change.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::tls::{PairFiles, TlsError};

/// How long certificate and key files must hold still, once a change is
/// seen, before they are loaded. Whoever replaces the pair writes (or
/// renames) two files; loading between the two would pair the new
/// certificate with the old key and log a failure that fixes itself a
/// moment later. Both steps of any sane writer finish within
/// milliseconds; 200 ms leaves room for a slow disk and delays a rotation
/// by nothing anyone notices.
const SETTLE: Duration = Duration::from_millis(200);

/// At most this many [`SETTLE`] waits (2 s) for files that keep changing
/// (a slow copy); then the reload is tried anyway.
const SETTLE_ROUNDS: usize = 10;

/// Every configured pair, loaded; the first is the default.
#[derive(Debug)]
struct CertSet {
    certs: Vec<Arc<CertifiedKey>>,
}

impl CertSet {
    /// Loads every pair; fails on the first that cannot be loaded.
    fn load(files: &[PairFiles], provider: &CryptoProvider) -> Result<Self, TlsError> {
        let certs = files
            .iter()
            .map(|f| f.load(provider).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { certs })
    }

    /// The certificate for a client that sent `sni`: the first whose
    /// end-entity certificate is valid for the name (SAN DNS names,
    /// wildcards included, as a client would check), else the first
    /// (the default). With one certificate nothing is parsed.
    fn choose(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let default = self.certs.first()?;
        if self.certs.len() > 1 {
            // rustls has already checked that an SNI is a DNS name.
            if let Some(name) = sni.and_then(|n| ServerName::try_from(n).ok()) {
                if let Some(ck) = self.certs.iter().find(|ck| valid_for(ck, &name)) {
                    return Some(ck.clone());
                }
            }
        }
        Some(default.clone())
    }
}

/// Whether `ck`'s end-entity certificate is valid for `name`. Parsing per
/// handshake costs microseconds (webpki reads the DER in place, without
/// allocating), next to the signature a full handshake computes anyway.
fn valid_for(ck: &CertifiedKey, name: &ServerName<'_>) -> bool {
    ck.cert.first().is_some_and(|leaf| {
        webpki::EndEntityCert::try_from(leaf)
            .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(name).is_ok())
    })
}

/// The rustls certificate resolver of every wss listener: the current
/// [`CertSet`], replaced whole on reload.
///
/// # Concurrency
/// Every handshake reads (a read lock held for an `Arc` clone); only the
/// reloader writes, once per successful reload (a write lock held for a
/// pointer swap). A handshake sees either the old set or the new one, never
/// a mix. A poisoned lock still holds a complete set (nothing panics while
/// holding it), so poisoning is ignored.
#[derive(Debug)]
pub(crate) struct CertStore {
    current: RwLock<Arc<CertSet>>,
}

impl CertStore {
    fn new(set: CertSet) -> Self {
        Self {
            current: RwLock::new(Arc::new(set)),
        }
    }

    fn get(&self) -> Arc<CertSet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, set: CertSet) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get().choose(hello.server_name())
    }
}

/// Asks the running gateway to reload its certificates now (what SIGHUP
/// does). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReloadHandle(Arc<Notify>);

impl ReloadHandle {
    /// Reloads every certificate and key file. Returns at once; the result
    /// is logged and counted (`gateway.tls.reloads`). Requests made while
    /// a reload runs are merged into one more reload.
    pub fn reload(&self) {
        // notify_one keeps a permit when the reloader is busy, so a request
        // during a reload is not lost.
        self.0.notify_one();
    }
}

/// A file's identity and version as `stat` (following symlinks) shows it:
/// a rewrite changes the modification time or length, a replacement
/// (rename, or a Kubernetes secret's `..data` symlink swapped) the inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// Stamps of every file, in order; `None` for a file that cannot be
/// stat'ed (missing for now: its reappearance is a change).
fn stamps(files: &[PairFiles]) -> Vec<Option<Stamp>> {
    let stamp = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    };
    files
        .iter()
        .flat_map(|f| [stamp(&f.cert), stamp(&f.key)])
        .collect()
}

/// The wss listeners' certificates, loaded, and what reloads them.
#[derive(Debug)]
pub(crate) struct TlsSettings {
    /// The rustls configuration of every wss listener.
    server_config: Arc<rustls::ServerConfig>,
    reloader: Reloader,
}

impl TlsSettings {
    /// Loads every pair (`files[0]` is the default) and builds the server
    /// configuration; `interval` is `tls.reload_interval`.
    pub(crate) fn load(files: Vec<PairFiles>, interval: Duration) -> Result<Self, TlsError> {
        let provider = crate::tls::provider();
        // Stamped before reading, so that a change racing the first load
        // is seen by the first poll.
        let seen = stamps(&files);
        let store = Arc::new(CertStore::new(CertSet::load(&files, &provider)?));
        let server_config = crate::tls::server_config(provider.clone(), store.clone())?;
        Ok(Self {
            server_config,
            reloader: Reloader {
                store,
                files,
                provider,
                interval,
                seen,
                requests: Arc::new(Notify::new()),
            },
        })
    }

    /// Starts the reloader (an admin-phase task: it runs until the
    /// gateway stops); returns the server configuration and the handle.
    pub(crate) fn start(
        self,
        metrics: Arc<Metrics>,
        shutdown: &Shutdown,
    ) -> (Arc<rustls::ServerConfig>, ReloadHandle) {
        let handle = ReloadHandle(self.reloader.requests.clone());
        shutdown.spawn_admin(self.reloader.run(metrics, shutdown.admin_stop()));
        (self.server_config, handle)
    }
}

/// The task that reloads the certificates: on a [`ReloadHandle`] request,
/// and when a poll every `tls.reload_interval` sees a file change.
#[derive(Debug)]
struct Reloader {
    store: Arc<CertStore>,
    files: Vec<PairFiles>,
    provider: Arc<CryptoProvider>,
    /// Zero: no polling.
    interval: Duration,
    /// The files as they were when last loaded (or tried).
    seen: Vec<Option<Stamp>>,
    requests: Arc<Notify>,
}

impl Reloader {
    async fn run(mut self, metrics: Arc<Metrics>, stop: CancellationToken) {
        let polling = !self.interval.is_zero();
        // A zero period would panic; it is unused when not polling.
        let mut tick = tokio::time::interval(self.interval.max(SETTLE));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            let trigger = tokio::select! {
                () = stop.cancelled() => return,
                () = self.requests.notified() => "signal",
                _ = tick.tick(), if polling => {
                    if stamps(&self.files) == self.seen {
                        continue;
                    }
                    self.settle().await;
                    "file_change"
                }
            };
            self.reload(trigger, &metrics);
        }
    }

    /// Waits until the files hold still for [`SETTLE`] (at most
    /// [`SETTLE_ROUNDS`] times).
    async fn settle(&self) {
        let mut last = stamps(&self.files);
        for _ in 0..SETTLE_ROUNDS {
            tokio::time::sleep(SETTLE).await;
            let now = stamps(&self.files);
            if now == last {
                return;
            }
            last = now;
        }
    }

    /// Loads every pair and swaps the set in, or keeps the current one.
    fn reload(&mut self, trigger: &'static str, metrics: &Metrics) {
        // Stamped before reading: a change during the read is seen next
        // poll (and reloaded again, which is harmless).
        self.seen = stamps(&self.files);
        // Synchronous reads on the runtime: a few KiB from a local file
        // (a secret volume is tmpfs), once per change.
        match CertSet::load(&self.files, &self.provider) {
            Ok(set) => {
                let certificates = set.certs.len();
                self.store.replace(set);
                metrics.tls_reload(true);
                info!(trigger, certificates, "tls certificates reloaded");
            }
            Err(e) => {
                metrics.tls_reload(false);
                error!(
                    trigger,
                    error = %e,
                    "tls certificate reload failed; still serving the previous certificates"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn cert(names: &[&str]) -> Arc<CertifiedKey> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        let c = params.self_signed(&key).unwrap();
        let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let provider = crate::tls::provider();
        Arc::new(CertifiedKey::from_der(vec![c.der().clone()], der, &provider).unwrap())
    }

    fn pick(set: &CertSet, sni: Option<&str>) -> usize {
        let ck = set.choose(sni).unwrap();
        set.certs.iter().position(|c| Arc::ptr_eq(c, &ck)).unwrap()
    }

    #[test]
    fn sni_picks_the_first_valid_certificate_else_the_default() {
        let set = CertSet {
            certs: vec![
                cert(&["default.test"]),
                cert(&["a.test"]),
                cert(&["*.b.test"]),
                cert(&["x.b.test"]),
            ],
        };
        assert_eq!(pick(&set, None), 0);
        assert_eq!(pick(&set, Some("default.test")), 0);
        assert_eq!(pick(&set, Some("a.test")), 1);
        assert_eq!(pick(&set, Some("A.TEST")), 1);
        // A wildcard covers one label; the first match wins over a later
        // exact one.
        assert_eq!(pick(&set, Some("x.b.test")), 2);
        assert_eq!(pick(&set, Some("y.x.b.test")), 0);
        assert_eq!(pick(&set, Some("unknown.test")), 0);
        assert_eq!(pick(&set, Some("not a name")), 0);
    }

    #[test]
    fn an_empty_set_resolves_to_nothing() {
        assert!(CertSet { certs: vec![] }.choose(Some("a.test")).is_none());
    }
}
