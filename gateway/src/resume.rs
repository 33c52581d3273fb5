//! Session resume: the credential registry and the replay buffer.
//!
//! A client asks for a resumable session with the request header
//! `X-Wsgw-Resume: new`. The 101 answer carries `X-Wsgw-Resume: <token>`
//! (the credential for the next resume) and `X-Wsgw-Received: <n>` (client
//! messages the gateway has received in this session). When the connection
//! is lost without a close, the session *detaches*: it stays on its link,
//! keeps the backend's messages (bounded), and waits `resume.grace` for the
//! client. The client reconnects with `X-Wsgw-Resume: <token>` and
//! `X-Wsgw-Received: <messages it has received>`; the gateway replays what
//! the client missed, in order, and answers with a fresh token and its own
//! count, so the client resends only what the gateway never got.
//!
//! Continuity that cannot be kept is said explicitly: HTTP 410 on resume.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::time::Instant;

use bytes::Bytes;
use fastwebsockets::upgrade::UpgradeFut;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use protocol::SessionId;

use crate::backend::QUEUED_OVERHEAD;

use crate::refusal::ResumeRefusal;

/// Request and response header carrying the resume credential.
pub(crate) const RESUME_HEADER: &str = "x-wsgw-resume";
/// Response header: how long (milliseconds) the session waits for a resume
/// once its connection is lost (`resume.grace`).
pub(crate) const GRACE_HEADER: &str = "x-wsgw-grace-ms";
/// Request header: backend messages the client has received in the session.
/// Response header: client messages the gateway has received.
pub(crate) const RECEIVED_HEADER: &str = "x-wsgw-received";

/// A resume credential: 128 random bits from the OS-seeded CSPRNG, hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Token(String);

impl Token {
    /// A fresh, unguessable token.
    pub(crate) fn generate() -> Self {
        let bytes: [u8; 16] = rand::rng().random();
        Token(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Parses a token from a header value (exactly 32 lower-case hex digits).
    pub(crate) fn parse(s: &str) -> Option<Self> {
        (s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Token(s.to_owned()))
    }

    /// The header value.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// A resumable session's valid credentials: the current token and, for a
/// while after a resume, the token that resume presented. A 101 can be lost
/// on the way (the handshake is cut on a flaky network); the client then
/// still holds only the token it presented, so that token keeps working
/// until the new connection proves it reached the client (its first frame
/// from the client) or `resume.grace` passes. Either token's resume takes
/// the session over, so one connection owns the session at a time.
#[derive(Debug)]
pub(crate) struct Credentials {
    current: Token,
    unproven: Option<(Token, Instant)>,
}

impl Credentials {
    /// A new session's credentials.
    pub(crate) fn new(current: Token) -> Self {
        Self {
            current,
            unproven: None,
        }
    }

    /// The token a 101 hands out: the newest.
    pub(crate) fn current(&self) -> &Token {
        &self.current
    }

    /// Whether a resume presenting `token` may take the session.
    pub(crate) fn accepts(&self, token: &Token) -> bool {
        *token == self.current
            || self
                .unproven
                .as_ref()
                .is_some_and(|(t, until)| t == token && Instant::now() < *until)
    }

    /// Keeps a token that a resume presented, not yet proven spent, good
    /// until at least `until` (the session is detached and waits that
    /// long).
    pub(crate) fn extend_unproven(&mut self, until: Instant) {
        if let Some((_, u)) = self.unproven.as_mut() {
            *u = (*u).max(until);
        }
    }

    /// Whether a token a resume presented is still unproven.
    pub(crate) fn has_unproven(&self) -> bool {
        self.unproven.is_some()
    }

    /// Every token that may still be registered for the session.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Token> {
        std::iter::once(&self.current).chain(self.unproven.as_ref().map(|(t, _)| t))
    }
}

/// Where a session's resume requests are sent (boxed: a channel allocates
/// room for 32 of them when it is made, and a session holds it for life).
type AttachSender = mpsc::Sender<Box<AttachRequest>>;

/// A resume attempt, handed from the upgrade handler (or, in a fleet, from
/// another instance asking for the session) to the session.
pub(crate) struct AttachRequest {
    /// The credential the client presented (it may have been replaced
    /// since the upgrade handler looked it up).
    pub(crate) token: Token,
    /// Backend messages the client says it has received.
    pub(crate) position: u64,
    /// Where the client's new connection is.
    pub(crate) to: AttachTo,
}

/// Where a resuming client is connected.
pub(crate) enum AttachTo {
    /// On this instance.
    Here {
        /// The upgrade, to complete once the session accepted the request.
        upgrade: UpgradeFut,
        /// The client's address.
        peer: std::net::SocketAddr,
        /// The session's answer.
        reply: oneshot::Sender<Result<Attached, ResumeRefusal>>,
    },
    /// On another instance of the fleet, which takes the session over: the
    /// answer is the session's state.
    Elsewhere {
        reply: oneshot::Sender<Result<Box<crate::fleet::wire::State>, ResumeRefusal>>,
    },
}

impl AttachRequest {
    /// Whether the requester stopped waiting.
    pub(crate) fn abandoned(&self) -> bool {
        match &self.to {
            AttachTo::Here { reply, .. } => reply.is_closed(),
            AttachTo::Elsewhere { reply } => reply.is_closed(),
        }
    }

    /// Refuses the request.
    pub(crate) fn refuse(self, why: ResumeRefusal) {
        match self.to {
            AttachTo::Here { reply, .. } => {
                let _ = reply.send(Err(why));
            }
            AttachTo::Elsewhere { reply } => {
                let _ = reply.send(Err(why));
            }
        }
    }
}

/// The session accepted a resume.
#[derive(Debug)]
pub(crate) struct Attached {
    /// Credential for the next resume.
    pub(crate) token: Token,
    /// Client messages the gateway has received in the session.
    pub(crate) received: u64,
}

/// Live resumable sessions by credential.
///
/// In a fleet every change is also written to the session directory (see
/// `crate::fleet`), so that another instance finds which one holds a
/// credential.
///
/// # Concurrency
/// Locked only when a resumable session starts, resumes or ends, and when a
/// resume request looks up its token; never per message.
#[derive(Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<Token, (SessionId, AttachSender)>>,
    directory: Option<crate::fleet::Directory>,
}

impl Registry {
    /// A registry that also keeps the fleet's session directory.
    pub(crate) fn new(directory: Option<crate::fleet::Directory>) -> Self {
        Self {
            sessions: Mutex::default(),
            directory,
        }
    }

    /// Registers a new resumable session; returns its token and the
    /// receiver of its resume requests.
    pub(crate) fn register(&self, id: SessionId) -> (Token, mpsc::Receiver<Box<AttachRequest>>) {
        let token = Token::generate();
        let rx = self.register_with(token.clone(), id);
        (token, rx)
    }

    /// Registers a session under a token it already has (one taken over
    /// from another instance of the fleet).
    pub(crate) fn register_with(
        &self,
        token: Token,
        id: SessionId,
    ) -> mpsc::Receiver<Box<AttachRequest>> {
        // One request at a time is enough: a second waits or is refused.
        let (tx, rx) = mpsc::channel(1);
        if let Some(d) = &self.directory {
            d.claim(&token);
        }
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(token, (id, tx));
        }
        rx
    }

    /// Every token held (for the directory's refresh).
    pub(crate) fn tokens(&self) -> Vec<Token> {
        self.sessions
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The resume channel of the session holding `token`.
    pub(crate) fn lookup(&self, token: &Token) -> Option<AttachSender> {
        self.sessions
            .lock()
            .ok()?
            .get(token)
            .map(|(_, tx)| tx.clone())
    }

    /// A resume presenting `presented` was accepted: a fresh token becomes
    /// current, `presented` stays valid until `until` or until
    /// [`Registry::proven`], and every other token of the session goes.
    pub(crate) fn rotate(
        &self,
        creds: &mut Credentials,
        presented: &Token,
        until: Instant,
    ) -> Option<()> {
        let mut m = self.sessions.lock().ok()?;
        let entry = m.get(presented)?.clone();
        for t in creds.all() {
            if t != presented {
                self.forget(&mut m, t);
            }
        }
        let token = Token::generate();
        if let Some(d) = &self.directory {
            d.claim(&token);
        }
        m.insert(token.clone(), entry);
        creds.current = token;
        creds.unproven = Some((presented.clone(), until));
        Some(())
    }

    /// The connection a resume handed out has shown it reached the client:
    /// the token that resume presented is void.
    pub(crate) fn proven(&self, creds: &mut Credentials) {
        if let Some((t, _)) = creds.unproven.take() {
            self.remove(&t);
        }
    }

    /// Forgets a session's token (the session ended).
    pub(crate) fn remove(&self, token: &Token) {
        if let Ok(mut m) = self.sessions.lock() {
            self.forget(&mut m, token);
        }
    }

    /// Forgets a token here only: the session went to another instance of
    /// the fleet, which owns its directory entry now.
    pub(crate) fn remove_local(&self, token: &Token) {
        if let Ok(mut m) = self.sessions.lock() {
            m.remove(token);
        }
    }

    fn forget(&self, m: &mut HashMap<Token, (SessionId, AttachSender)>, token: &Token) {
        if m.remove(token).is_some() {
            if let Some(d) = &self.directory {
                d.forget(token);
            }
        }
    }
}

/// The most recent backend messages sent to the client, for replay.
///
/// Holds messages with sequence numbers `[delivered - len, delivered)`.
/// Payloads are copied in (not shared with the link's read buffer) so that
/// a buffered message holds only its own bytes.
#[derive(Debug)]
pub(crate) struct Ring {
    items: VecDeque<(Bytes, bool)>,
    /// Payload bytes held.
    bytes: usize,
    /// Backend messages delivered (or, while detached, accepted) so far.
    delivered: u64,
    /// Bound on payload bytes plus [`QUEUED_OVERHEAD`] per message: no
    /// bound on the number of messages, so a burst of small ones does not
    /// push out what a client may still need.
    max_bytes: usize,
}

impl Ring {
    /// An empty ring holding at most `max_bytes` (payload + 64 B each).
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            delivered: 0,
            max_bytes,
        }
    }

    /// What the ring holds, as its bound counts it.
    fn cost(&self) -> usize {
        self.bytes + self.items.len() * QUEUED_OVERHEAD
    }

    /// Appends message number `delivered`; evicts the oldest beyond the
    /// bounds, but none numbered `keep_from` or later (`u64::MAX` lets any
    /// go). Returns the bytes evicted.
    pub(crate) fn push(&mut self, payload: &Bytes, text: bool, keep_from: u64) -> usize {
        self.items
            .push_back((Bytes::copy_from_slice(payload), text));
        self.bytes += payload.len();
        self.delivered += 1;
        let mut freed = 0;
        // The newest message always stays, even one larger than the bound
        // (up to `max_message_size`): it may be the one a resume needs.
        while self.cost() > self.max_bytes && self.items.len() > 1 && self.oldest_held() < keep_from
        {
            match self.items.pop_front() {
                Some((p, _)) => {
                    self.bytes -= p.len();
                    freed += p.len();
                }
                None => break,
            }
        }
        freed
    }

    /// A ring taken over from another instance: `items` are messages
    /// `delivered - items.len() .. delivered`, oldest first.
    pub(crate) fn from_parts(
        max_bytes: usize,
        delivered: u64,
        items: VecDeque<(Bytes, bool)>,
    ) -> Self {
        let bytes = items.iter().map(|(p, _)| p.len()).sum();
        Self {
            items,
            bytes,
            delivered,
            max_bytes,
        }
    }

    /// The messages held, oldest first.
    pub(crate) fn items(&self) -> impl Iterator<Item = &(Bytes, bool)> {
        self.items.iter()
    }

    /// Sequence number of the next message (messages delivered so far).
    pub(crate) fn next_seq(&self) -> u64 {
        self.delivered
    }

    /// Sequence number of the oldest message still held.
    pub(crate) fn oldest_held(&self) -> u64 {
        self.delivered - self.items.len() as u64
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The messages from `position` on, if they are all still held.
    pub(crate) fn since(&self, position: u64) -> Result<Vec<(Bytes, bool)>, ResumeRefusal> {
        if position > self.delivered {
            return Err(ResumeRefusal::BadPosition);
        }
        let oldest = self.delivered - self.items.len() as u64;
        if position < oldest {
            return Err(ResumeRefusal::Gap);
        }
        let skip = usize::try_from(position - oldest).unwrap_or(usize::MAX);
        Ok(self.items.iter().skip(skip).cloned().collect())
    }
}

/// Gateway-wide accounting of detached sessions.
#[derive(Default)]
pub(crate) struct DetachedBudget {
    sessions: AtomicUsize,
    bytes: AtomicUsize,
}

impl DetachedBudget {
    /// Takes a detached slot holding `bytes`, if both caps allow.
    pub(crate) fn try_detach(&self, bytes: usize, max_sessions: usize, max_bytes: usize) -> bool {
        if self.sessions.fetch_add(1, Ordering::AcqRel) >= max_sessions {
            self.sessions.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if !self.try_grow(bytes, max_bytes) {
            self.sessions.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Takes a detached slot holding `bytes` whatever the caps (a session
    /// handed off on drain, whose memory is held already).
    pub(crate) fn force_detach(&self, bytes: usize) {
        self.sessions.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Adds `bytes` for a detached session, if the cap allows.
    pub(crate) fn try_grow(&self, bytes: usize, max_bytes: usize) -> bool {
        let before = self.bytes.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > max_bytes {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Releases `bytes` (evicted or freed).
    pub(crate) fn shrink(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Gives back a detached slot and the bytes it held.
    pub(crate) fn release(&self, bytes: usize) {
        self.sessions.fetch_sub(1, Ordering::AcqRel);
        self.shrink(bytes);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ring_replays_from_a_held_position_and_refuses_gaps() {
        // Room for four 1-byte messages (each counts 1 + 64 bytes).
        let mut r = Ring::new(4 * 65);
        for i in 0..10u8 {
            r.push(&Bytes::from(vec![i]), false, u64::MAX);
        }
        assert_eq!(r.delivered, 10);
        let since = r.since(7).unwrap();
        assert_eq!(
            since.iter().map(|(b, _)| b[0]).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
        assert!(r.since(10).unwrap().is_empty());
        assert_eq!(r.since(6).unwrap().len(), 4);
        assert_eq!(r.since(5), Err(ResumeRefusal::Gap));
        assert_eq!(r.since(11), Err(ResumeRefusal::BadPosition));
    }

    #[test]
    fn ring_is_bounded_by_bytes() {
        let mut r = Ring::new(2 * (60 + QUEUED_OVERHEAD));
        assert_eq!(r.push(&Bytes::from(vec![0; 60]), true, u64::MAX), 0);
        assert_eq!(r.push(&Bytes::from(vec![0; 60]), true, u64::MAX), 0);
        assert_eq!(r.push(&Bytes::from(vec![0; 60]), true, u64::MAX), 60);
        assert_eq!(r.bytes(), 120);
        // No bound on the number: 1,000 empty messages fit in 64,000 bytes.
        let mut r = Ring::new(1000 * QUEUED_OVERHEAD);
        for _ in 0..1000 {
            assert_eq!(r.push(&Bytes::new(), true, u64::MAX), 0);
        }
        assert_eq!(r.since(0).unwrap().len(), 1000);
    }

    #[test]
    fn while_detached_the_ring_keeps_what_the_client_never_saw() {
        let mut r = Ring::new(3 * 65);
        for i in 0..3u8 {
            r.push(&Bytes::from(vec![i]), false, u64::MAX);
        }
        // Detached after 3 messages: older ones may go, newer ones stay.
        let from = r.next_seq();
        for i in 3..6u8 {
            r.push(&Bytes::from(vec![i]), false, from);
        }
        assert_eq!(r.oldest_held(), 3, "only messages from before go");
        // Beyond the bounds, nothing the client never saw goes.
        r.push(&Bytes::from(vec![6]), false, from);
        assert_eq!(r.since(3).unwrap().len(), 4);
        let mut r = Ring::new(100);
        r.push(&Bytes::from(vec![0; 60]), false, 0);
        r.push(&Bytes::from(vec![0; 60]), false, 0);
        assert_eq!(r.bytes(), 120);
        assert_eq!(r.since(0).unwrap().len(), 2);
    }

    #[test]
    fn tokens_are_random_and_strictly_parsed() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a, b);
        assert_eq!(Token::parse(a.as_str()), Some(a.clone()));
        assert_eq!(Token::parse("new"), None);
        assert_eq!(Token::parse(&"G".repeat(32)), None);
    }

    #[test]
    fn budget_caps_sessions_and_bytes() {
        let b = DetachedBudget::default();
        assert!(b.try_detach(10, 2, 100));
        assert!(b.try_detach(10, 2, 100));
        assert!(!b.try_detach(10, 2, 100), "session cap");
        assert!(!b.try_grow(81, 100), "byte cap");
        assert!(b.try_grow(80, 100));
        b.release(90);
        assert_eq!(b.bytes.load(Ordering::Acquire), 10);
    }

    #[test]
    fn registry_rotates_tokens_single_use() {
        let reg = Registry::default();
        let (t1, _rx) = reg.register(SessionId(1));
        assert!(reg.lookup(&t1).is_some());
        let mut c = Credentials::new(t1.clone());
        let later = Instant::now() + std::time::Duration::from_secs(60);
        reg.rotate(&mut c, &t1, later).unwrap();
        let t2 = c.current().clone();
        assert_ne!(t1, t2);
        // Until the new connection is proven, both tokens resume.
        assert!(reg.lookup(&t1).is_some() && reg.lookup(&t2).is_some());
        assert!(c.accepts(&t1) && c.accepts(&t2));
        // The 101 with t2 was lost: the client resumes with t1 again. t2,
        // never seen by the client, goes.
        reg.rotate(&mut c, &t1, later).unwrap();
        let t3 = c.current().clone();
        assert!(reg.lookup(&t2).is_none() && !c.accepts(&t2));
        assert!(c.accepts(&t1) && c.accepts(&t3));
        // The connection proved itself: t1 is spent.
        reg.proven(&mut c);
        assert!(reg.lookup(&t1).is_none() && !c.accepts(&t1));
        // An unproven token also expires.
        reg.rotate(&mut c, &t3, Instant::now()).unwrap();
        assert!(!c.accepts(&t3));
        assert!(c.accepts(c.current()));
        for t in c.all() {
            reg.remove(t);
        }
        assert!(reg.lookup(c.current()).is_none());
    }
}
