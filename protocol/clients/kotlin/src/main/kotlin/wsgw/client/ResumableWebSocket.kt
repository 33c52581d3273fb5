package wsgw.client

import java.io.IOException
import java.net.ProtocolException
import java.util.ArrayDeque
import java.util.concurrent.Executor
import java.util.concurrent.Executors
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.ScheduledExecutorService
import java.util.concurrent.ScheduledFuture
import java.util.concurrent.ThreadFactory
import java.util.concurrent.ThreadPoolExecutor
import java.util.concurrent.TimeUnit
import java.util.concurrent.locks.ReentrantLock
import kotlin.concurrent.withLock
import okhttp3.OkHttpClient
import okhttp3.Request
import okhttp3.Response
import okhttp3.WebSocket
import okhttp3.WebSocketListener
import okio.ByteString

/**
 * A WebSocket session through the wsgw gateway that survives lost
 * connections: every message arrives exactly once, in order, with its type,
 * in both directions (README, "Mobile client guide").
 *
 * ```
 * val ws = ResumableWebSocket.connect(okHttpClient, request, listener)
 * ws.send("hello")          // queued while disconnected, resent after a resume
 * ws.close(1000, "bye")     // ends the session
 * ```
 *
 * The session asks the gateway for a resume token (`X-Wsgw-Resume: new`),
 * counts the messages it hands to the app, keeps what it sent in an outbox
 * until the gateway confirms it, and after a lost connection resumes with
 * the token and its count: the gateway replays what the app missed and
 * says how much of the outbox it has; the rest is resent.
 */
class ResumableWebSocket private constructor(
    private val factory: WebSocket.Factory,
    private val request: Request,
    private val listener: ResumableListener,
    options: Options
) {
    private val opts = options.copy()

    init {
        // OkHttp queues at most 16 MiB per connection, and when a send would
        // pass that it queues close(1001) itself, which ends the session.
        // Every message in OkHttp's queue of the current connection is also
        // in the outbox, so an outbox bound at or below 16 MiB keeps OkHttp
        // under its limit, also when a resume resends the whole outbox.
        require(opts.maxOutboxBytes in 1..OKHTTP_QUEUE_BYTES) {
            "maxOutboxBytes must be in 1..$OKHTTP_QUEUE_BYTES (OkHttp's own queue limit), not ${opts.maxOutboxBytes}"
        }
    }

    private val executor: Executor = opts.callbackExecutor ?: callbackThread()

    // # Concurrency
    //
    // OkHttp 3.x calls back on its own threads (the dispatcher thread that
    // opened a connection goes on to read from it; the connection's writer
    // thread reports write and ping failures), the app calls
    // send/close/reconnect on any thread, and reconnect timers fire on a
    // scheduler thread. Every field
    // below is read and written only with `lock` held, so each event is one
    // step of the state machine: a resend in onOpen cannot interleave with
    // a new send, and a count cannot change between a stale check and the
    // next resume's X-Wsgw-Received. App callbacks are queued, in order,
    // with the lock held, and run without it (see `post`).
    private val lock = ReentrantLock()
    private val roomForEvents = lock.newCondition()

    /** The resume token of the session; null before the first 101 of a session. */
    private var token: String? = null
    /** Data messages (text and binary) of this session handed to the app. */
    private var received = 0L
    /** Our messages the gateway has confirmed (its last `X-Wsgw-Received`). */
    private var confirmed = 0L
    /** Messages sent but not confirmed, oldest first; number `confirmed` is the head. */
    private val outbox = ArrayDeque<Message>()
    private var outboxBytes = 0L
    /** Bytes of new messages sent on the current connection (for outbox trimming). */
    private var sentSinceOpen = 0L
    /** The connection whose callbacks count; every other one is stale. */
    private var current: WebSocket? = null
    /** `current` has opened (its 101 was seen and handled). */
    private var open = false
    /** Open connections replaced by `reconnect`, cancelled once the new one opens or fails. */
    private val abandoned = ArrayList<WebSocket>()
    /** When `current` opened (System.nanoTime); meaningful while `open`. */
    private var openedAtNanos = 0L
    /** `current` has delivered a message to the app since it opened. */
    private var deliveredSinceOpen = false
    /**
     * Attempts since the last connection that worked (see
     * [connectionEndedLocked]): the backoff exponent.
     */
    private var attempt = 0
    /** Resumes started because [Options.outboxTrimBytes] were sent on one connection. */
    private var trims = 0L
    private var timer: ScheduledFuture<*>? = null
    private var closing = false
    private var closeCode = 0
    private var closeReason: String? = null
    /** The session is over: no more connections, no more callbacks after the last one. */
    private var finished = false
    /** App callbacks not yet run, in order. */
    private val events = ArrayDeque<Runnable>()
    private var draining = false

    /** The current connection is open: sends go out now rather than at the next resume. */
    val isOpen: Boolean get() = lock.withLock { open }

    /** Messages of this session delivered to the app so far (the resume's `X-Wsgw-Received`). */
    val receivedCount: Long get() = lock.withLock { received }

    /** Messages sent but not yet confirmed by the gateway (kept for resending). */
    val unconfirmedCount: Int get() = lock.withLock { outbox.size }

    /** Resumes the library started to trim the outbox ([Options.outboxTrimBytes]), for diagnostics. */
    val outboxTrims: Long get() = lock.withLock { trims }

    /**
     * Sends a text message, now or after the next resume. False if the
     * session is closing or over, or the outbox is full
     * ([Options.maxOutboxBytes]).
     */
    fun send(text: String): Boolean = enqueue(Message.Text(text))

    /** Sends a binary message; as [send] for text. */
    fun send(bytes: ByteString): Boolean = enqueue(Message.Binary(bytes))

    /**
     * Ends the session: what is still unconfirmed is sent first (after a
     * resume if the connection is down), then a close frame. [ResumableListener.onClosed]
     * follows when the gateway answers. False if already closing or over.
     *
     * @throws IllegalArgumentException if `code` may not be sent (OkHttp
     *   3.x's rule: 1000-4999 without 1004-1006 and 1012-2999) or `reason`
     *   is over 123 bytes in UTF-8; the session is unchanged then.
     */
    fun close(code: Int, reason: String?): Boolean {
        // Checked before any state changes: OkHttp's close() throws on
        // either, and a throw after `closing` is set would leave the session
        // unable to close, or (thrown in onOpen) failing and reconnecting
        // forever.
        require(closeCodeValid(code)) { "close code $code is reserved or out of range" }
        require(reason == null || reason.toByteArray(Charsets.UTF_8).size <= MAX_CLOSE_REASON_BYTES) {
            "close reason is over $MAX_CLOSE_REASON_BYTES bytes in UTF-8"
        }
        return lock.withLock { closeLocked(code, reason) }
    }

    private fun closeLocked(code: Int, reason: String?): Boolean {
        if (finished || closing) return false
        closing = true
        closeCode = code
        closeReason = reason
        val ws = current
        if (open && ws != null) {
            ws.close(code, reason)
        } else if (token == null && ws == null && outbox.isEmpty()) {
            // No session exists at the gateway, none is being opened, and
            // nothing the app sent is waiting for one.
            finishLocked(Runnable { listener.onClosed(this, code, reason ?: "") })
        }
        // Otherwise the connection being opened, or the one the pending
        // retry opens (a new session if the old one was lost), resends the
        // outbox, then closes: accepted messages are never dropped silently.
        return true
    }

    /**
     * Resumes on a new connection now, for example after the device
     * switched networks. The current connection's callbacks are ignored from
     * now on; it is cancelled once the new one opens or fails (the gateway
     * hands the session over either way). While a connection is still
     * being opened it is cancelled and opened afresh (after a network change
     * the one in flight may hang until its timeout); a handshake cancelled
     * before its onOpen never answers the gateway's ping, so its token stays
     * valid for the new one.
     */
    fun reconnect(): Unit = lock.withLock {
        if (!finished && !closing) reconnectLocked()
    }

    /**
     * Drops everything at once, without a close frame and without further
     * callbacks: callbacks queued but not yet run are dropped too (one
     * already running finishes). The gateway keeps the session until its
     * grace period ends.
     */
    fun cancel(): Unit = lock.withLock {
        if (finished) return
        finished = true
        events.clear()
        roomForEvents.signalAll()
        timer?.cancel(false)
        current?.cancel()
        current = null
        open = false
        cancelAbandonedLocked()
    }

    private fun enqueue(m: Message): Boolean = lock.withLock {
        if (finished || closing || outboxBytes + m.size > opts.maxOutboxBytes) return false
        outbox.addLast(m)
        outboxBytes += m.size
        val ws = current
        if (open && ws != null) {
            if (!m.sendOn(ws)) {
                // OkHttp's queue is full or the connection failed: the
                // message is in the outbox; cut and resume, which resends.
                ws.cancel()
            } else {
                sentSinceOpen += m.size
                if (sentSinceOpen >= opts.outboxTrimBytes) {
                    trims++
                    reconnectLocked()
                }
            }
        }
        true
    }

    private fun start(): Unit = lock.withLock { connectLocked() }

    private fun connectLocked() {
        timer?.cancel(false)
        timer = null
        // No resume is skipped by our own clock against X-Wsgw-Grace-Ms: the
        // gateway's grace starts when it notices the loss, which can be
        // ping_interval + ping_timeout (and half a second) after we did, so only its 410 says
        // the session is gone.
        val b = request.newBuilder()
        val t = token
        if (t == null) {
            b.header(RESUME, "new").removeHeader(RECEIVED)
        } else {
            b.header(RESUME, t).header(RECEIVED, received.toString())
        }
        open = false
        current = factory.newWebSocket(b.build(), Connection())
    }

    private fun reconnectLocked() {
        val ws = current
        if (ws != null) {
            if (open) {
                connectionEndedLocked()
                abandoned.add(ws)
            } else {
                ws.cancel()
            }
        }
        current = null
        open = false
        connectLocked()
    }

    /** Connection lost or refused for now: try again after a backoff delay. */
    private fun retryLocked(t: Throwable?, atLeastMillis: Long) {
        val delay = maxOf(Policy.backoffMillis(attempt, opts.backoffBaseMillis, opts.backoffMaxMillis), atLeastMillis)
        attempt++
        post(Runnable { listener.onDisconnected(this, t, delay) })
        timer?.cancel(false)
        timer = scheduler.schedule({
            lock.withLock { if (!finished && current == null) connectLocked() }
        }, delay, TimeUnit.MILLISECONDS)
    }

    /**
     * The open `current` connection ended. If it worked (it delivered a
     * message, or stayed up [STABLE_MILLIS]), the backoff starts over;
     * otherwise a loop of connections that open and drop at once (a 101,
     * then a close or a reset) keeps backing off further.
     */
    private fun connectionEndedLocked() {
        if (deliveredSinceOpen ||
            System.nanoTime() - openedAtNanos >= TimeUnit.MILLISECONDS.toNanos(STABLE_MILLIS)
        ) {
            attempt = 0
        }
    }

    /** The session cannot go on: forget it, tell the app; the caller starts the next. */
    private fun sessionLostLocked(reason: String) {
        val unconfirmed: List<Message> = ArrayList(outbox)
        token = null
        received = 0
        confirmed = 0
        outbox.clear()
        outboxBytes = 0
        post(Runnable { listener.onSessionLost(this, reason, unconfirmed) })
    }

    private fun finishLocked(last: Runnable) {
        finished = true
        timer?.cancel(false)
        cancelAbandonedLocked()
        post(last)
    }

    private fun cancelAbandonedLocked() {
        for (ws in abandoned) ws.cancel()
        abandoned.clear()
    }

    /**
     * Queues an app callback. Called with the lock held, so callbacks run
     * in the order the state machine took its steps; they run one at a
     * time on the executor, without the lock.
     */
    private fun post(event: Runnable) {
        events.addLast(event)
        if (!draining) {
            draining = true
            executor.execute { drainOne() }
        }
    }

    /** Runs one callback, then asks the executor again: a shared thread is not held. */
    private fun drainOne() {
        val event = lock.withLock { events.pollFirst() }
        try {
            event?.run()
        } finally {
            lock.withLock {
                roomForEvents.signalAll()
                if (events.isEmpty()) draining = false else executor.execute { drainOne() }
            }
        }
    }

    /** A message on the current connection: count it, hand it over, push back if the app lags. */
    private fun deliver(ws: WebSocket, event: Runnable): Unit = lock.withLock {
        if (ws !== current || finished) return
        received++
        deliveredSinceOpen = true
        post(event)
        // Backpressure: OkHttp reads the next frame only when this returns.
        while (events.size > opts.maxPendingCallbacks && ws === current && !finished) {
            roomForEvents.await(100, TimeUnit.MILLISECONDS)
        }
    }

    /** One OkHttp connection's callbacks; those of a stale connection are ignored. */
    private inner class Connection : WebSocketListener() {
        override fun onOpen(webSocket: WebSocket, response: Response): Unit = lock.withLock {
            if (webSocket !== current || finished) {
                // Replaced while connecting: close it before it sends a
                // frame (a frame would void the token we still hold).
                webSocket.cancel()
                return
            }
            val newToken = response.header(RESUME)
            val theirs = response.header(RECEIVED)?.toLongOrNull()
            if (newToken == null || theirs == null) {
                webSocket.cancel()
                current = null
                finishLocked(Runnable {
                    listener.onFailure(this@ResumableWebSocket,
                        ProtocolException("the 101 has no $RESUME and $RECEIVED: is resume.enabled on at the gateway?"),
                        response)
                })
                return
            }
            if (theirs < confirmed || theirs > confirmed + outbox.size) {
                // Resending from here would lose or duplicate messages.
                webSocket.cancel()
                current = null
                sessionLostLocked("the gateway has $theirs of our messages; we sent ${confirmed + outbox.size}, $confirmed confirmed")
                connectLocked()
                return
            }
            val resumed = token != null
            while (confirmed < theirs) {
                outboxBytes -= outbox.removeFirst().size
                confirmed++
            }
            token = newToken
            open = true
            openedAtNanos = System.nanoTime()
            deliveredSinceOpen = false
            sentSinceOpen = 0
            cancelAbandonedLocked()
            post(Runnable { listener.onOpen(this@ResumableWebSocket, resumed) })
            // OkHttp sends what is queued in onOpen before any later send;
            // the lock keeps new sends out until the resend is queued.
            for (m in outbox) {
                if (!m.sendOn(webSocket)) {
                    webSocket.cancel()
                    return
                }
            }
            if (closing) webSocket.close(closeCode, closeReason)
        }

        override fun onMessage(webSocket: WebSocket, text: String): Unit =
            deliver(webSocket, Runnable { listener.onMessage(this@ResumableWebSocket, text) })

        override fun onMessage(webSocket: WebSocket, bytes: ByteString): Unit =
            deliver(webSocket, Runnable { listener.onMessage(this@ResumableWebSocket, bytes) })

        override fun onClosing(webSocket: WebSocket, code: Int, reason: String): Unit = lock.withLock {
            if (webSocket !== current) {
                webSocket.cancel()
                return
            }
            // OkHttp answers a close frame only when asked to; without the
            // answer the gateway waits for it and the socket lingers.
            webSocket.close(1000, null)
            if (open) connectionEndedLocked()
            current = null
            open = false
            if (finished) return
            val next = Policy.afterClose(code, reason)
            // While closing, the gateway's close frame answers ours, unless
            // it is a 4000 that crossed it (not the echo of our own 4000):
            // the instance handed the session off before it read our close.
            // The resume then resends the outbox and closes (onOpen).
            if (closing && (next != Policy.AfterClose.RESUME_NOW || code == closeCode)) {
                finishLocked(Runnable { listener.onClosed(this@ResumableWebSocket, code, reason) })
                return
            }
            when (next) {
                // As after a lost connection, with the same token, counts and
                // outbox, but at once: the gateway asked for it.
                Policy.AfterClose.RESUME_NOW -> {
                    post(Runnable { listener.onDisconnected(this@ResumableWebSocket, null, 0) })
                    connectLocked()
                }
                Policy.AfterClose.END ->
                    finishLocked(Runnable { listener.onClosed(this@ResumableWebSocket, code, reason) })
                Policy.AfterClose.NEW_SESSION_NOW -> {
                    sessionLostLocked("closed by the gateway: $code $reason")
                    connectLocked()
                }
                Policy.AfterClose.NEW_SESSION_LATER -> {
                    sessionLostLocked("closed by the gateway: $code $reason")
                    retryLocked(null, 0)
                }
            }
        }

        override fun onClosed(webSocket: WebSocket, code: Int, reason: String) {
            // Always after onClosing, which made this connection stale.
        }

        override fun onFailure(webSocket: WebSocket, t: Throwable, response: Response?): Unit = lock.withLock {
            abandoned.remove(webSocket)
            if (webSocket !== current) return
            val wasOpen = open
            if (wasOpen) connectionEndedLocked()
            current = null
            open = false
            cancelAbandonedLocked()
            if (finished) return
            if (response != null && !wasOpen) {
                val status = statusOf(response)
                when (Policy.afterRefusal(status, token != null)) {
                    Policy.AfterRefusal.SESSION_LOST -> if (closing) {
                        finishLocked(Runnable {
                            listener.onFailure(this@ResumableWebSocket,
                                IOException("session lost (HTTP $status) before the close completed"), response)
                        })
                    } else {
                        sessionLostLocked("HTTP $status to the resume")
                        connectLocked()
                    }
                    Policy.AfterRefusal.END -> finishLocked(Runnable {
                        listener.onFailure(this@ResumableWebSocket, ProtocolException("upgrade refused: HTTP $status"), response)
                    })
                    Policy.AfterRefusal.RETRY -> retryLocked(t, retryAfterMillis(response))
                }
                return
            }
            // No 101 seen (a cut handshake) keeps the old token and counts:
            // the gateway keeps it valid until our first frame on a new
            // connection.
            retryLocked(t, 0)
        }
    }

    companion object {
        /** Request header: `new`, or the token to resume; response header: the next token. */
        const val RESUME = "X-Wsgw-Resume"

        /** Request header: data messages received; response header: ours the gateway has. */
        const val RECEIVED = "X-Wsgw-Received"

        /**
         * Response header: how long the gateway keeps a detached session, in
         * ms. Informational: the library lets the gateway's 410 decide (see
         * connectLocked).
         */
        const val GRACE = "X-Wsgw-Grace-Ms"

        /** OkHttp 3.x's per-connection queue limit (RealWebSocket.MAX_QUEUE_SIZE). */
        private const val OKHTTP_QUEUE_BYTES = 16L shl 20

        /** RFC 6455 5.5: a control frame's payload is at most 125 bytes, 2 of them the code. */
        const val MAX_CLOSE_REASON_BYTES = 123

        /**
         * A connection that stayed open this long worked, data or not: the
         * backoff starts over. Longer than a handshake plus the gateway's
         * first reply take, short enough that a user never sees its effect.
         */
        private const val STABLE_MILLIS = 5_000L

        /** One daemon thread for every session's reconnect timers: they only call connect. */
        private val scheduler: ScheduledExecutorService =
            Executors.newSingleThreadScheduledExecutor(daemonThreads("wsgw reconnect"))

        /**
         * Opens a resumable session through `client`. The library uses a
         * copy of the client with [Options.pingIntervalMillis] when it has no
         * ping interval, and a read timeout of at least
         * [Options.handshakeTimeoutMillis]; everything else (TLS, proxy,
         * interceptors, dispatcher) is the client's own.
         */
        @JvmStatic
        @JvmOverloads
        fun connect(
            client: OkHttpClient,
            request: Request,
            listener: ResumableListener,
            options: Options = Options()
        ): ResumableWebSocket = open(forWebSockets(client, options), request, listener, options)

        /**
         * Opens a resumable session on connections from `factory` (a test
         * may wrap an OkHttpClient to cut connections); pings and timeouts
         * are the factory's.
         */
        @JvmStatic
        @JvmOverloads
        fun connect(
            factory: WebSocket.Factory,
            request: Request,
            listener: ResumableListener,
            options: Options = Options()
        ): ResumableWebSocket = open(factory, request, listener, options)

        private fun open(
            factory: WebSocket.Factory,
            request: Request,
            listener: ResumableListener,
            options: Options
        ): ResumableWebSocket {
            val ws = ResumableWebSocket(factory, request, listener, options)
            ws.start()
            return ws
        }

        /** `client` with pings and a handshake timeout fit for resuming. */
        @JvmStatic
        fun forWebSockets(client: OkHttpClient, options: Options): OkHttpClient {
            val needsPing = pingIntervalOf(client) == 0 && options.pingIntervalMillis > 0
            val read = readTimeoutOf(client)
            val needsTimeout = read != 0 && read < options.handshakeTimeoutMillis
            if (!needsPing && !needsTimeout) return client
            val b = client.newBuilder()
            if (needsPing) b.pingInterval(options.pingIntervalMillis, TimeUnit.MILLISECONDS)
            if (needsTimeout) b.readTimeout(options.handshakeTimeoutMillis, TimeUnit.MILLISECONDS)
            return b.build()
        }

        /** `Retry-After` in seconds (what the gateway's 503 carries), as ms; 0 if none. */
        private fun retryAfterMillis(response: Response): Long =
            (response.header("Retry-After")?.trim()?.toLongOrNull() ?: 0L).coerceIn(0L, 300L) * 1000

        /** OkHttp 3's rule for the codes an endpoint may send. */
        private fun closeCodeValid(code: Int): Boolean =
            code in 1000..4999 && code !in 1004..1006 && code !in 1012..2999

        private fun callbackThread(): Executor {
            val e = ThreadPoolExecutor(1, 1, 10, TimeUnit.SECONDS, LinkedBlockingQueue<Runnable>(),
                daemonThreads("wsgw callbacks"))
            // The thread ends when idle, so a finished session leaves none behind.
            e.allowCoreThreadTimeOut(true)
            return e
        }

        private fun daemonThreads(name: String) = ThreadFactory { r ->
            val t = Thread(r, name)
            t.isDaemon = true
            t
        }
    }
}
