package wsgw.client

import okhttp3.WebSocket
import okio.ByteString

/**
 * One message of the session, with its WebSocket type: the outbox keeps
 * the type so that a text message is resent as text after a resume.
 */
sealed class Message {
    /** A text message. */
    class Text(@JvmField val text: String) : Message() {
        override val size: Long = utf8Size(text)
        override fun sendOn(ws: WebSocket): Boolean = ws.send(text)
        override fun toString(): String = "Text(${text.length} chars)"
    }

    /** A binary message. */
    class Binary(@JvmField val bytes: ByteString) : Message() {
        override val size: Long = sizeOf(bytes).toLong()
        override fun sendOn(ws: WebSocket): Boolean = ws.send(bytes)
        override fun toString(): String = "Binary($size bytes)"
    }

    /** Payload bytes (UTF-8 for text): what the outbox bounds count. */
    abstract val size: Long

    /** Queues the message on an OkHttp connection, with its type. */
    internal abstract fun sendOn(ws: WebSocket): Boolean
}
