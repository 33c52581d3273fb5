package wsgw.client

import okhttp3.Response
import okio.ByteString

/**
 * What a [ResumableWebSocket] tells the app. Every method has an empty
 * default: override the ones you need (from Java too).
 *
 * Callbacks arrive one at a time, in order, on the
 * [Options.callbackExecutor] (by default one thread of this session's own),
 * never on OkHttp's threads and never while the library holds its lock:
 * calling [ResumableWebSocket.send] or [ResumableWebSocket.close] from a
 * callback is fine. While more than [Options.maxPendingCallbacks] callbacks
 * wait, the library stops reading from the network (backpressure), so a
 * slow callback slows the session down instead of filling memory.
 */
abstract class ResumableListener {
    /**
     * A connection opened: a new session (`resumed` false), or the same
     * session resumed (`resumed` true; nothing was lost, nothing will be
     * duplicated). Informational: sending never waits for it.
     */
    open fun onOpen(ws: ResumableWebSocket, resumed: Boolean) {}

    /** A text message from the backend, exactly once and in order. */
    open fun onMessage(ws: ResumableWebSocket, text: String) {}

    /** A binary message from the backend, exactly once and in order. */
    open fun onMessage(ws: ResumableWebSocket, bytes: ByteString) {}

    /**
     * The connection was lost (no close frame: a network change, a timeout,
     * a cut), or the gateway asked for a resume (close 4000, "resume now":
     * an instance of a fleet going away, `t` null, `retryInMillis` 0); the
     * library resumes the session in `retryInMillis`.
     * Informational: messages sent meanwhile are kept and delivered.
     */
    open fun onDisconnected(ws: ResumableWebSocket, t: Throwable?, retryInMillis: Long) {}

    /**
     * The session could not be continued (the gateway answered 410, or 400
     * to a resume; the grace period passed; or the gateway closed it with a
     * code that says "reconnect"). The library has already started a new
     * session: resync the app's state with the backend.
     *
     * `unconfirmed` are the messages of the old session that the gateway
     * had not confirmed: the backend may or may not have them. They are not
     * resent. Messages sent after the loss belong to the new session.
     */
    open fun onSessionLost(ws: ResumableWebSocket, reason: String, unconfirmed: List<Message>) {}

    /**
     * The session ended with a close frame and will not be reconnected:
     * the app's [ResumableWebSocket.close] completed, or the gateway closed
     * it with a code that says "don't reconnect" (README, "Close codes").
     * The last callback.
     */
    open fun onClosed(ws: ResumableWebSocket, code: Int, reason: String) {}

    /**
     * The session ended without a close frame and will not be reconnected:
     * the gateway refused the upgrade in a way retrying cannot fix
     * (`response` holds its status and headers), or it answered without the
     * resume headers (resume off), or the session was lost while closing.
     * The last callback.
     */
    open fun onFailure(ws: ResumableWebSocket, t: Throwable, response: Response?) {}
}
