package wsgw.client

import java.util.concurrent.Executor

/**
 * Settings of a [ResumableWebSocket]. The defaults follow the README's
 * mobile client guide; a test may shorten them.
 */
class Options {
    /**
     * How often the client pings (OkHttp's `pingInterval`, set on the
     * client it is given when that has none). A dead connection (a network
     * change, a tunnel) is noticed within two intervals, instead of when
     * the phone next sends. 15 s: under the gateway's own 20 s idle ping,
     * and well under the NAT timeouts of mobile carriers.
     */
    @JvmField var pingIntervalMillis: Long = 15_000

    /**
     * Lower bound for OkHttp's read timeout, which bounds the wait for the
     * 101: above the gateway's `resume.handoff_timeout` (10 s), as the
     * guide asks.
     */
    @JvmField var handshakeTimeoutMillis: Long = 15_000

    /** First reconnect delay (before jitter); doubled per failed attempt. */
    @JvmField var backoffBaseMillis: Long = 500

    /** Longest reconnect delay (before jitter). */
    @JvmField var backoffMaxMillis: Long = 30_000

    /**
     * The outbox keeps every sent message until the gateway confirms it,
     * which it does only when a connection opens. After this many bytes
     * sent on one connection, the library resumes on a fresh connection
     * (old one closed once the new one is open), so that a long-lived
     * connection does not keep everything it ever sent.
     */
    @JvmField var outboxTrimBytes: Long = 1L shl 20

    /**
     * Most bytes the outbox holds: past it, [ResumableWebSocket.send]
     * returns false. At most 16 MiB, OkHttp 3.x's per-connection queue
     * limit: the outbox is resent on one connection after a resume, and an
     * OkHttp send past that limit closes the connection with 1001 by
     * itself, which ends the session. [ResumableWebSocket.connect] throws
     * IllegalArgumentException for a larger value.
     */
    @JvmField var maxOutboxBytes: Long = 16L shl 20

    /**
     * Callbacks waiting for the app before the library stops reading from
     * the network. 256 messages ride out a busy main thread without holding
     * more than that many messages in memory.
     */
    @JvmField var maxPendingCallbacks: Int = 256

    /**
     * Where callbacks run, one at a time (for example Android's main
     * thread executor; the library keeps them in order on any executor).
     * It must run tasks later, not inline in `execute`: the library hands
     * them over while it holds its lock. By default a thread of the
     * session's own, which ends when idle.
     */
    @JvmField var callbackExecutor: Executor? = null

    internal fun copy(): Options {
        val o = Options()
        o.pingIntervalMillis = pingIntervalMillis
        o.handshakeTimeoutMillis = handshakeTimeoutMillis
        o.backoffBaseMillis = backoffBaseMillis
        o.backoffMaxMillis = backoffMaxMillis
        o.outboxTrimBytes = outboxTrimBytes
        o.maxOutboxBytes = maxOutboxBytes
        o.maxPendingCallbacks = maxPendingCallbacks
        o.callbackExecutor = callbackExecutor
        return o
    }
}
