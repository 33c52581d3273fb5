package wsgw.client

import java.util.concurrent.ThreadLocalRandom

/**
 * The gateway's answers, mapped to what the client does next. Pure
 * functions of the README's tables ("Close codes", the HTTP refusals and
 * the mobile client guide), kept apart so they can be read against them.
 */
internal object Policy {
    /** What a close frame from the gateway on the live connection means. */
    enum class AfterClose {
        /** The session goes on: resume it at once, without backoff, as after a lost connection. */
        RESUME_NOW,
        /** The session is over and reconnecting would not help. */
        END,
        /** The session is over; start a new one at once (another instance answers). */
        NEW_SESSION_NOW,
        /** The session is over; start a new one after a backoff delay. */
        NEW_SESSION_LATER
    }

    /** The reason the gateway gives with 1008 when a newer connection took the session. */
    const val TAKEN_OVER = "session resumed on another connection"

    /** "Resume now": the gateway's own code, never a backend's (the gateway turns a backend's 4000 into 1011). */
    const val RESUME_NOW = 4000

    /** README "Close codes": every code the gateway sends, and whether to reconnect. */
    fun afterClose(code: Int, reason: String): AfterClose = when (code) {
        // A fleet instance going away (a deploy) keeps the session for
        // another instance to take over: the load balancer sends the resume
        // there.
        RESUME_NOW -> AfterClose.RESUME_NOW
        // Drain: this instance stops, another one takes new sessions.
        1001 -> AfterClose.NEW_SESSION_NOW
        // Slow consumer, or the backend's policy code: try again later. Not
        // after a takeover, though: the newer connection has the session,
        // and fighting for it would only ping-pong between the two.
        1008 -> if (reason == TAKEN_OVER) AfterClose.END else AfterClose.NEW_SESSION_LATER
        // Backend trouble, lost link, try again later, bad gateway.
        1011, 1012, 1013, 1014 -> AfterClose.NEW_SESSION_LATER
        // 1000 (ended normally), 1002/1007 (a client bug), 1003, 1009 (do not
        // resend that message), 3000-3999 and 4001-4999 (the app's codes: the app decides),
        // and anything the table does not list.
        else -> AfterClose.END
    }

    /** What an HTTP answer other than 101 to an upgrade means. */
    enum class AfterRefusal {
        /** The session cannot be resumed: start a new one and resync (410, or 400 to a resume). */
        SESSION_LOST,
        /** Try the same request again after a backoff delay (busy, draining, a middlebox). */
        RETRY,
        /** A configuration or client error that retrying cannot fix. */
        END
    }

    /** README "Before the upgrade, refusals are HTTP". */
    fun afterRefusal(status: Int, resuming: Boolean): AfterRefusal = when {
        status == 410 -> AfterRefusal.SESSION_LOST
        // 400 to a resume: our received count is more than the gateway ever
        // sent; it cannot be trusted, so it is treated like 410.
        status == 400 && resuming -> AfterRefusal.SESSION_LOST
        // 101 that OkHttp rejected (a header a proxy mangled), request
        // timeout, too many requests, and every 5xx (503 carries Retry-After).
        status == 101 || status == 408 || status == 429 || status >= 500 -> AfterRefusal.RETRY
        // 400 to a new session, 404, 405, 414, 426, 431, 401/403 from an
        // authenticating proxy: the request itself is wrong.
        else -> AfterRefusal.END
    }

    /**
     * The guide's reconnect backoff: `min(max, base * 2^attempt)` times a
     * random factor in [0.5, 1) ("equal jitter"), so that a fleet of phones
     * dropped at once does not come back at once, yet none waits longer
     * than the cap.
     */
    fun backoffMillis(attempt: Int, baseMillis: Long, maxMillis: Long): Long {
        val shift = attempt.coerceIn(0, 30)
        val full = if (baseMillis > (maxMillis shr shift)) maxMillis else minOf(maxMillis, baseMillis shl shift)
        return (full * (0.5 + 0.5 * ThreadLocalRandom.current().nextDouble())).toLong()
    }
}
