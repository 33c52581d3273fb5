//! A fleet: several gateway instances sharing resumable sessions through
//! Redis, so that a client's resume may reach any of them.
//!
//! Redis holds two things, and nothing per message:
//! - **The session directory**: `<prefix>:t:<token>` → the `instance_id` of
//!   the instance holding the session with that resume credential. Written
//!   when a resumable session starts, resumes (a new token) or moves here;
//!   deleted when it ends; each entry expires `fleet.directory_ttl` after
//!   its holder last refreshed it (every third of that), so the entries of
//!   a crashed instance go by themselves.
//! - **One pub/sub channel per instance**, `<prefix>:i:<instance_id>`: an
//!   instance whose client presents a token it does not hold looks up the
//!   holder and publishes a request on the holder's channel; the holder
//!   takes the session off its link and publishes the session's state (the
//!   replay ring, the counts, the unacknowledged messages) on the asker's
//!   channel. The asker then moves the session onto its own link with
//!   version 3's `resume` (see `crate::session::run_imported`).
//!
//! Exactly one instance holds a session: the holder serves one request for
//! it at a time and, once it has answered with the state, holds nothing.
//! `PUBLISH` says how many subscribers received a request, so a request
//! for a crashed holder is answered at once (no subscriber: the session is
//! lost), not after a timeout.
//!
//! Redis unavailable: sessions resumed on the instance that holds them are
//! not affected (nothing local waits for Redis: directory writes are
//! queued and written by one task); a resume that needs another instance
//! gets 503 with `Retry-After` after at most `fleet.handover_timeout`.

pub(crate) mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use prost::Message;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::refusal::ResumeRefusal;
use crate::resume::{AttachRequest, AttachTo, Token};
use crate::shared::Shared;

/// Directory writes queued at most; beyond, a write is dropped (counted in
/// the log) and that session can only be resumed where it is.
const DIRECTORY_QUEUE: usize = 65_536;
/// Directory writes sent to Redis in one pipeline at most.
const DIRECTORY_BATCH: usize = 512;
/// Wait between retries of a resume whose session is in flight between
/// instances (the directory not yet updated).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Deletes a directory entry only if it still names the instance given.
const DELETE_IF_OWNER: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Refreshes directory entries (KEYS) for instance ARGV[1] with expiry
/// ARGV[2] seconds, unless another instance holds one now.
const REFRESH_MINE: &str = "for _, k in ipairs(KEYS) do \
     local v = redis.call('GET', k) \
     if (not v) or v == ARGV[1] then redis.call('SET', k, ARGV[1], 'EX', ARGV[2]) end \
     end return 0";

/// How long an instance's liveness key outlives its last refresh (every
/// third of it, while it is subscribed to its channel).
const ALIVE_TTL: Duration = Duration::from_secs(3);

/// How often the channel's connection is checked with a PING, and how long
/// the answer may take: a connection that went silent (a partition, a
/// Redis host lost) is replaced.
const PING_EVERY: Duration = Duration::from_secs(1);

/// How long a request to every instance (no directory entry) waits for the
/// holder's answer; past it, no instance holds the session (410).
const BROADCAST_WAIT: Duration = Duration::from_millis(500);

/// What the holder keeps of the asker's remaining wait for the reply's
/// way back.
const REPLY_MARGIN: Duration = Duration::from_millis(250);

/// `[fleet]`, resolved.
#[derive(Debug, Clone)]
pub(crate) struct FleetSettings {
    pub(crate) redis_url: String,
    pub(crate) prefix: String,
    pub(crate) handover_timeout: Duration,
    pub(crate) directory_ttl: Duration,
}

/// One change to the session directory.
pub(crate) enum Write {
    /// This instance holds the session with this token.
    Claim(String),
    /// The token is void.
    Forget(String),
}

/// The directory writer's queue, held by the resume registry.
pub(crate) struct Directory {
    tx: mpsc::Sender<Write>,
    dropped: AtomicU64,
}

impl Directory {
    /// Records that this instance holds the session with `token`.
    pub(crate) fn claim(&self, token: &Token) {
        self.send(Write::Claim(token.as_str().to_owned()));
    }

    /// Records that `token` is void (its session ended here).
    pub(crate) fn forget(&self, token: &Token) {
        self.send(Write::Forget(token.as_str().to_owned()));
    }

    fn send(&self, w: Write) {
        if self.tx.try_send(w).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                warn!(
                    dropped = n + 1,
                    "fleet: session directory writes dropped (Redis too slow or down)"
                );
            }
        }
    }
}

/// This instance's membership of the fleet.
///
/// # Concurrency
/// Shared by the upgrade handlers, sessions and its own tasks: the Redis
/// connection is a multiplexed handle (cheap to clone), the table of
/// resumes waiting for an answer is a mutex taken twice per handover.
pub(crate) struct Fleet {
    settings: FleetSettings,
    /// This instance's `Hello.instance_id`.
    instance: String,
    client: redis::Client,
    redis: ConnectionManager,
    /// Subscribed to this instance's channel right now.
    listening: AtomicBool,
    /// Handover requests sent, waiting for their answer, by request id.
    waiting: Mutex<HashMap<u64, oneshot::Sender<wire::Reply>>>,
    next_request: AtomicU64,
    /// Tokens of sessions handed over lately, and when: a request for one
    /// is answered "stale" (ask the directory again) rather than "unknown".
    moved: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Wakes the directory's refresh (after a resubscription).
    refresh_now: tokio::sync::Notify,
}

impl Fleet {
    /// Connects (lazily: Redis may come later) and returns the fleet and
    /// the directory writer's queue for the resume registry. The tasks
    /// start with [`Fleet::spawn`].
    pub(crate) fn new(
        settings: FleetSettings,
        instance: String,
    ) -> redis::RedisResult<(Arc<Self>, Directory, mpsc::Receiver<Write>)> {
        let client = redis::Client::open(settings.redis_url.as_str())?;
        let timeout = settings.handover_timeout;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_max_delay(Duration::from_secs(2));
        let redis = client.get_connection_manager_lazy(config)?;
        let (tx, rx) = mpsc::channel(DIRECTORY_QUEUE);
        let fleet = Arc::new(Self {
            settings,
            instance,
            client,
            redis,
            listening: AtomicBool::new(false),
            waiting: Mutex::default(),
            next_request: AtomicU64::new(1),
            moved: Mutex::default(),
            refresh_now: tokio::sync::Notify::new(),
        });
        let directory = Directory {
            tx,
            dropped: AtomicU64::new(0),
        };
        Ok((fleet, directory, rx))
    }

    /// Starts the channel listener, the directory writer and its refresh;
    /// they run until the links stop (after the sessions are gone, so that
    /// a draining instance keeps handing sessions over).
    pub(crate) fn spawn(self: &Arc<Self>, shared: &Arc<Shared>, writes: mpsc::Receiver<Write>) {
        let stop = shared.shutdown.links_stop();
        let listen = self.clone().listen(shared.clone(), stop.clone());
        shared.shutdown.spawn_link(listen);
        let write = self.clone().write_directory(writes, stop.clone());
        shared.shutdown.spawn_link(write);
        let refresh = self.clone().refresh_directory(shared.clone(), stop);
        shared.shutdown.spawn_link(refresh);
    }

    /// This instance's `Hello.instance_id`.
    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether requests for this instance's sessions can reach it now.
    pub(crate) fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    fn token_key(&self, token: &str) -> String {
        format!("{}:t:{token}", self.settings.prefix)
    }

    /// The channel every instance listens on too (requests for a token the
    /// directory does not know).
    fn everyone(&self) -> String {
        format!("{}:all", self.settings.prefix)
    }

    fn alive_key(&self, instance: &str) -> String {
        format!("{}:alive:{instance}", self.settings.prefix)
    }

    fn channel(&self, instance: &str) -> String {
        format!("{}:i:{instance}", self.settings.prefix)
    }

    /// Takes over the session holding `token` from the instance that holds
    /// it, for a client that has received `position` of its messages.
    pub(crate) async fn take(
        &self,
        token: &Token,
        position: u64,
    ) -> Result<wire::State, ResumeRefusal> {
        let deadline = tokio::time::Instant::now() + self.settings.handover_timeout;
        match tokio::time::timeout_at(deadline, self.take_by(token, position, deadline)).await {
            Ok(answer) => answer,
            Err(_) => Err(ResumeRefusal::FleetUnavailable),
        }
    }

    async fn take_by(
        &self,
        token: &Token,
        position: u64,
        deadline: tokio::time::Instant,
    ) -> Result<wire::State, ResumeRefusal> {
        if !self.is_listening() {
            // The answer could not reach us.
            return Err(ResumeRefusal::FleetUnavailable);
        }
        let key = self.token_key(token.as_str());
        loop {
            let mut redis = self.redis.clone();
            let owner: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .map_err(|_| ResumeRefusal::FleetUnavailable)?;
            let answer = match owner {
                // No entry: written late (directory writes are queued), or
                // lost with a Redis that came back empty, or the session
                // is gone. Ask every instance; only a holder answers.
                None => {
                    let by = deadline.min(tokio::time::Instant::now() + BROADCAST_WAIT);
                    self.ask(&self.everyone(), token, position, by).await
                }
                Some(owner) => self.ask_owner(&owner, token, position, deadline).await,
            };
            match answer {
                // The session moved on meanwhile ("stale": its holder just
                // handed it to a third instance) or is busy: ask again
                // where it is now, while time remains; out of time, it is
                // not lost: 503.
                Err(ResumeRefusal::Stale | ResumeRefusal::SessionBusy) => {
                    if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                        return Err(ResumeRefusal::FleetUnavailable);
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    /// Asks the instance the directory names; `OwnerLost` only once it is
    /// known gone (its entry then deleted).
    async fn ask_owner(
        &self,
        owner: &str,
        token: &Token,
        position: u64,
        deadline: tokio::time::Instant,
    ) -> Result<wire::State, ResumeRefusal> {
        let key = self.token_key(token.as_str());
        let mut redis = self.redis.clone();
        let answer = if owner == self.instance {
            // Ours by the directory, and not here: handed on lately
            // (the new holder's entry not written yet), or an entry
            // left behind by a session that ended.
            if self.moved_lately(token.as_str()) {
                Err(ResumeRefusal::Stale)
            } else {
                Err(ResumeRefusal::Unknown)
            }
        } else {
            self.ask(&self.channel(owner), token, position, deadline)
                .await
        };
        match answer {
            // Nobody listens on the holder's channel: dead, or between
            // two subscriptions (a Redis blip). Its liveness key tells.
            Err(ResumeRefusal::OwnerLost) => {
                let alive: bool = redis::cmd("EXISTS")
                    .arg(self.alive_key(owner))
                    .query_async(&mut redis)
                    .await
                    .map_err(|_| ResumeRefusal::FleetUnavailable)?;
                if alive {
                    return Err(ResumeRefusal::FleetUnavailable);
                }
                // Gone: so is its entry (unless it changed meanwhile).
                let _: Result<(), _> = redis::cmd("EVAL")
                    .arg(DELETE_IF_OWNER)
                    .arg(1)
                    .arg(&key)
                    .arg(owner)
                    .query_async(&mut redis)
                    .await;
                Err(ResumeRefusal::OwnerLost)
            }
            other => other,
        }
    }

    /// One request on `channel` and its answer, by `deadline`
    /// (`FleetUnavailable` past it); `OwnerLost` if nobody listens there.
    async fn ask(
        &self,
        channel: &str,
        token: &Token,
        position: u64,
        deadline: tokio::time::Instant,
    ) -> Result<wire::State, ResumeRefusal> {
        let broadcast = channel == self.everyone();
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting_table().insert(request_id, tx);
        let _unwait = Unwait(self, request_id);
        let envelope = wire::Envelope {
            kind: Some(wire::Kind::Request(wire::Request {
                request_id,
                from_instance: self.instance.clone(),
                token: token.as_str().to_owned(),
                position,
                wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                broadcast,
            })),
        };
        let mut redis = self.redis.clone();
        let receivers: u64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(envelope.encode_to_vec())
            .query_async(&mut redis)
            .await
            .map_err(|_| ResumeRefusal::FleetUnavailable)?;
        if receivers == 0 {
            return Err(ResumeRefusal::OwnerLost);
        }
        let reply = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply,
            // Asked of everyone and nobody holds it: gone.
            Err(_) if broadcast => return Err(ResumeRefusal::Unknown),
            _ => return Err(ResumeRefusal::FleetUnavailable),
        };
        match reply.state {
            Some(state) => Ok(state),
            None => Err(ResumeRefusal::from_label(&reply.refused)),
        }
    }

    fn waiting_table(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<wire::Reply>>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves this instance's channel: requests for its sessions, answers
    /// to its own requests. While subscribed, it keeps the instance's
    /// liveness key and checks the connection with a PING; it resubscribes
    /// after Redis comes back (and has the directory rewritten then).
    async fn listen(self: Arc<Self>, shared: Arc<Shared>, stop: CancellationToken) {
        let channel = self.channel(&self.instance);
        let mut backoff = Duration::from_millis(100);
        loop {
            let subscribe = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                pubsub.subscribe(self.everyone()).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let limit = self.settings.handover_timeout;
            let subscribed = tokio::select! {
                () = stop.cancelled() => return,
                s = tokio::time::timeout(limit, subscribe) => s,
            };
            match subscribed {
                Ok(Ok(pubsub)) => {
                    info!(channel, "fleet: listening for handover requests");
                    self.listening.store(true, Ordering::Release);
                    shared.metrics.fleet_connected(1);
                    self.refresh_now.notify_one();
                    backoff = Duration::from_millis(100);
                    let stopped = self.serve_channel(&shared, pubsub, &stop).await;
                    self.listening.store(false, Ordering::Release);
                    shared.metrics.fleet_connected(-1);
                    if stopped {
                        self.leave().await;
                        return;
                    }
                    warn!("fleet: lost the Redis channel; handovers pause until it is back");
                }
                Ok(Err(e)) => {
                    if backoff == Duration::from_millis(100) {
                        warn!(error = %e, "fleet: cannot subscribe to Redis; retrying");
                    }
                }
                Err(_) => {
                    if backoff == Duration::from_millis(100) {
                        warn!("fleet: Redis does not answer the subscription; retrying");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One subscription's life: messages, the liveness key, the PINGs.
    /// True when the gateway is stopping, false when the connection failed.
    async fn serve_channel(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        pubsub: redis::aio::PubSub,
        stop: &CancellationToken,
    ) -> bool {
        let (mut sink, mut messages) = pubsub.split();
        let mut tick = tokio::time::interval(PING_EVERY);
        let alive_every = ALIVE_TTL / 3;
        let mut alive_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return true,
                m = messages.next() => match m {
                    Some(msg) => self.on_message(shared, msg.get_payload_bytes()),
                    None => return false,
                },
                _ = tick.tick() => {
                    let pong = tokio::time::timeout(PING_EVERY, sink.ping::<redis::Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        return false;
                    }
                    if tokio::time::Instant::now() >= alive_at {
                        self.mark_alive().await;
                        alive_at = tokio::time::Instant::now() + alive_every;
                    }
                }
            }
        }
    }

    /// Sets this instance's liveness key: requests to it that find no
    /// subscriber mean "wait", not "gone", while it exists.
    async fn mark_alive(&self) {
        let mut redis = self.redis.clone();
        let _: Result<(), _> = redis::cmd("SET")
            .arg(self.alive_key(&self.instance))
            .arg(1)
            .arg("PX")
            .arg(u64::try_from(ALIVE_TTL.as_millis()).unwrap_or(6000))
            .query_async(&mut redis)
            .await;
    }

    /// Stopping: this instance holds nothing any more.
    async fn leave(&self) {
        let mut redis = self.redis.clone();
        let mut del = redis::cmd("DEL");
        del.arg(self.alive_key(&self.instance));
        let _ =
            tokio::time::timeout(Duration::from_secs(1), del.query_async::<()>(&mut redis)).await;
    }

    fn on_message(self: &Arc<Self>, shared: &Arc<Shared>, payload: &[u8]) {
        let Ok(envelope) = wire::Envelope::decode(payload) else {
            warn!("fleet: undecodable message on this instance's channel");
            return;
        };
        match envelope.kind {
            Some(wire::Kind::Reply(reply)) => {
                let waiter = self.waiting_table().remove(&reply.request_id);
                let late = match waiter {
                    Some(tx) => tx.send(reply).err(),
                    None => Some(reply),
                };
                // The asking resume gave up, but the holder let the
                // session go: take it in, detached, so that the client's
                // next resume finds it here.
                if let Some(wire::Reply {
                    state: Some(state),
                    token,
                    ..
                }) = late
                {
                    crate::upgrade::take_in_late(shared, state, &token);
                }
            }
            Some(wire::Kind::Request(req)) => {
                let task = self.clone().serve_request(shared.clone(), req);
                shared.shutdown.spawn_link(task);
            }
            None => {}
        }
    }

    /// Another instance asks for one of this instance's sessions.
    async fn serve_request(self: Arc<Self>, shared: Arc<Shared>, req: wire::Request) {
        // What would reach the asker after it gave up is not started.
        let wait = Duration::from_millis(req.wait_ms)
            .min(self.settings.handover_timeout)
            .saturating_sub(REPLY_MARGIN);
        let answer = match Token::parse(&req.token) {
            None => Err(ResumeRefusal::Unknown),
            Some(_) if wait.is_zero() => Err(ResumeRefusal::SessionBusy),
            Some(token) => self.hand_over(&shared, token, req.position, wait).await,
        };
        let answer = match answer {
            Err(ResumeRefusal::Unknown) if self.moved_lately(&req.token) => {
                Err(ResumeRefusal::Stale)
            }
            // Asked of everyone, and not ours: only the holder answers.
            Err(ResumeRefusal::Unknown) if req.broadcast => return,
            Ok(state) => {
                self.moved_now(&req.token);
                Ok(state)
            }
            other => other,
        };
        let (state, refused) = match answer {
            Ok(state) => (Some(*state), String::new()),
            Err(why) => (None, why.label().to_owned()),
        };
        let label = if state.is_some() {
            "ok"
        } else {
            ResumeRefusal::from_label(&refused).label()
        };
        shared.metrics.handover("out", label);
        let carried = state.is_some();
        let envelope = wire::Envelope {
            kind: Some(wire::Kind::Reply(wire::Reply {
                request_id: req.request_id,
                state,
                refused,
                token: req.token.clone(),
            })),
        };
        let mut redis = self.redis.clone();
        let mut publish = redis::cmd("PUBLISH");
        publish
            .arg(self.channel(&req.from_instance))
            .arg(envelope.encode_to_vec());
        let limit = self.settings.handover_timeout;
        let sent = tokio::time::timeout(limit, publish.query_async::<u64>(&mut redis)).await;
        if carried && !matches!(sent, Ok(Ok(n)) if n > 0) {
            crate::logs::limited!(
                warn,
                to = req.from_instance,
                "fleet: a session handed over did not reach the instance that asked; it is lost"
            );
        }
    }

    /// Whether the session with this token was handed over lately (within
    /// `fleet.handover_timeout`).
    fn moved_lately(&self, token: &str) -> bool {
        let now = tokio::time::Instant::now();
        let mut moved = self
            .moved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        moved.retain(|_, until| *until > now);
        moved.contains_key(token)
    }

    fn moved_now(&self, token: &str) {
        let now = tokio::time::Instant::now();
        let until = now + self.settings.handover_timeout;
        let mut moved = self
            .moved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded by the handovers of one handover_timeout.
        moved.retain(|_, u| *u > now);
        moved.insert(token.to_owned(), until);
    }

    /// Asks the local session holding `token` for its state, within
    /// `wait`.
    async fn hand_over(
        &self,
        shared: &Shared,
        token: Token,
        position: u64,
        wait: Duration,
    ) -> Result<Box<wire::State>, ResumeRefusal> {
        let session = shared
            .resumable
            .lookup(&token)
            .ok_or(ResumeRefusal::Unknown)?;
        let (reply, answer) = oneshot::channel();
        let request = Box::new(AttachRequest {
            token,
            position,
            to: AttachTo::Elsewhere { reply },
        });
        let asked = async {
            session.send(request).await.ok()?;
            answer.await.ok()
        };
        match tokio::time::timeout(wait, asked).await {
            Ok(Some(answer)) => answer,
            _ => Err(ResumeRefusal::SessionBusy),
        }
    }

    /// Applies directory changes in order, batched into pipelines.
    async fn write_directory(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Write>,
        stop: CancellationToken,
    ) {
        let ttl = self.settings.directory_ttl.as_secs().max(1);
        let mut batch = Vec::with_capacity(DIRECTORY_BATCH);
        loop {
            let n = tokio::select! {
                () = stop.cancelled() => return,
                n = rx.recv_many(&mut batch, DIRECTORY_BATCH) => n,
            };
            if n == 0 {
                return;
            }
            let mut pipe = redis::pipe();
            for w in batch.drain(..) {
                match w {
                    Write::Claim(t) => {
                        pipe.cmd("SET")
                            .arg(self.token_key(&t))
                            .arg(&self.instance)
                            .arg("EX")
                            .arg(ttl)
                            .ignore();
                    }
                    Write::Forget(t) => {
                        pipe.cmd("DEL").arg(self.token_key(&t)).ignore();
                    }
                }
            }
            let mut redis = self.redis.clone();
            if let Err(e) = pipe.query_async::<()>(&mut redis).await {
                debug!(error = %e, writes = n, "fleet: session directory writes failed");
            }
        }
    }

    /// Rewrites every token held here, every third of
    /// `fleet.directory_ttl` and at once after (re)subscribing (Redis may
    /// have come back empty); an entry another instance holds now is left
    /// alone.
    async fn refresh_directory(self: Arc<Self>, shared: Arc<Shared>, stop: CancellationToken) {
        let ttl = self.settings.directory_ttl;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(ttl / 3) => {}
                () = self.refresh_now.notified() => {}
            }
            let tokens = shared.resumable.tokens();
            for chunk in tokens.chunks(DIRECTORY_BATCH) {
                let mut script = redis::cmd("EVAL");
                script.arg(REFRESH_MINE).arg(chunk.len());
                for t in chunk {
                    script.arg(self.token_key(t.as_str()));
                }
                script.arg(&self.instance).arg(ttl.as_secs().max(1));
                let mut redis = self.redis.clone();
                if let Err(e) = script.query_async::<()>(&mut redis).await {
                    debug!(error = %e, "fleet: session directory refresh failed");
                }
            }
        }
    }
}

/// Removes a request from the waiting table however its wait ends.
struct Unwait<'a>(&'a Fleet, u64);

impl Drop for Unwait<'_> {
    fn drop(&mut self) {
        self.0.waiting_table().remove(&self.1);
    }
}
