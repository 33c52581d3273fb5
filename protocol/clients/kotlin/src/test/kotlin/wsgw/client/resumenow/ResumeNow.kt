// Close code 4000 ("resume now", README "Close codes"), without a gateway:
// only a fleet instance being drained sends it, which needs Redis, so this
// program plays the gateway itself on fake OkHttp connections and checks
// that the library resumes at once with the same token, counts and outbox,
// and tells the app only onDisconnected (no onSessionLost, no onClosed).
// tests/tests/kotlin_client.rs runs it; it prints "resume-now OK" or fails.
package wsgw.client.resumenow

import java.util.ArrayDeque
import java.util.concurrent.Executor
import okhttp3.Protocol
import okhttp3.Request
import okhttp3.Response
import okhttp3.WebSocket
import okhttp3.WebSocketListener
import okio.ByteString
import wsgw.client.Message
import wsgw.client.Options
import wsgw.client.ResumableListener
import wsgw.client.ResumableWebSocket

/** One connection the library opened; the test answers for the gateway and reads what was sent. */
class FakeConnection(private val request: Request, val listener: WebSocketListener) : WebSocket {
    /** What the library did on it, in order: `text X`, `binary N`, `close CODE REASON`, `cancel`. */
    val sent = ArrayList<String>()

    fun header(name: String): String? = request.header(name)

    /** The gateway's 101, with the next token and how many of the client's messages it has. */
    fun open(token: String, theirs: Long) = listener.onOpen(this, Response.Builder()
        .request(request).protocol(Protocol.HTTP_1_1).code(101).message("Switching Protocols")
        .header(ResumableWebSocket.RESUME, token)
        .header(ResumableWebSocket.RECEIVED, theirs.toString())
        .build())

    override fun request(): Request = request
    override fun queueSize(): Long = 0
    override fun send(text: String): Boolean = sent.add("text $text")
    override fun send(bytes: ByteString): Boolean = sent.add("binary ${bytes.size()}")
    override fun close(code: Int, reason: String?): Boolean = sent.add("close $code ${reason ?: ""}")
    override fun cancel() {
        sent.add("cancel")
    }
}

class FakeFactory : WebSocket.Factory {
    val connections = ArrayList<FakeConnection>()

    override fun newWebSocket(request: Request, listener: WebSocketListener): WebSocket =
        FakeConnection(request, listener).also { connections.add(it) }
}

fun expect(what: String, got: Any?, want: Any?) {
    check(got == want) { "$what: got $got, want $want" }
}

fun main() {
    // Callbacks run when the test says, on its own thread (never inline in
    // execute, as Options.callbackExecutor asks).
    val queued = ArrayDeque<Runnable>()
    val options = Options()
    options.callbackExecutor = Executor { queued.addLast(it) }
    val events = ArrayList<String>()
    fun callbacks(): List<String> {
        while (queued.isNotEmpty()) queued.removeFirst().run()
        return ArrayList(events).also { events.clear() }
    }
    val listener = object : ResumableListener() {
        override fun onOpen(ws: ResumableWebSocket, resumed: Boolean) { events.add("open resumed=$resumed") }
        override fun onMessage(ws: ResumableWebSocket, text: String) { events.add("text $text") }
        override fun onDisconnected(ws: ResumableWebSocket, t: Throwable?, retryInMillis: Long) {
            events.add("disconnected $t $retryInMillis")
        }
        override fun onSessionLost(ws: ResumableWebSocket, reason: String, unconfirmed: List<Message>) {
            events.add("lost $reason")
        }
        override fun onClosed(ws: ResumableWebSocket, code: Int, reason: String) { events.add("closed $code $reason") }
        override fun onFailure(ws: ResumableWebSocket, t: Throwable, response: Response?) { events.add("failure $t") }
    }
    val factory = FakeFactory()
    val request = Request.Builder().url("wss://gw.invalid/ws").build()
    val drain = "resume: this gateway is restarting"

    val ws = ResumableWebSocket.connect(factory, request, listener, options)
    val c1 = factory.connections.last()
    expect("first request", c1.header(ResumableWebSocket.RESUME), "new")
    c1.open("t1", 0)
    ws.send("a")
    ws.send("b")
    c1.listener.onMessage(c1, "x")
    expect("first connection", callbacks(), listOf("open resumed=false", "text x"))
    expect("sent on it", c1.sent, listOf("text a", "text b"))

    // 4000: the close is answered and the resume starts before onClosing
    // returns (no backoff timer), with the token and the count.
    c1.listener.onClosing(c1, 4000, drain)
    expect("answer to the 4000", c1.sent.last(), "close 1000 ")
    expect("connections after the 4000", factory.connections.size, 2)
    val c2 = factory.connections.last()
    expect("resume token", c2.header(ResumableWebSocket.RESUME), "t1")
    expect("resume count", c2.header(ResumableWebSocket.RECEIVED), "1")
    expect("callbacks after the 4000", callbacks(), listOf("disconnected null 0"))
    // The gateway has "a": "b" is resent from the outbox.
    c2.open("t2", 1)
    expect("resumed", callbacks(), listOf("open resumed=true"))
    expect("resent", c2.sent, listOf("text b"))
    expect("unconfirmed", ws.unconfirmedCount, 1)

    // A 4000 that crosses the app's close: the session is not over at the
    // gateway, so resume, resend, then close.
    ws.close(1000, "bye")
    c2.listener.onClosing(c2, 4000, drain)
    expect("connections after a 4000 while closing", factory.connections.size, 3)
    val c3 = factory.connections.last()
    expect("resume token", c3.header(ResumableWebSocket.RESUME), "t2")
    expect("callbacks after the 4000", callbacks(), listOf("disconnected null 0"))
    c3.open("t3", 1)
    expect("resent, then closed", c3.sent, listOf("text b", "close 1000 bye"))
    c3.listener.onClosing(c3, 1000, "bye")
    expect("the end", callbacks(), listOf("open resumed=true", "closed 1000 bye"))
    expect("connections in all", factory.connections.size, 3)

    // An app that closes with 4000 itself gets its code echoed: that ends it.
    val ws2 = ResumableWebSocket.connect(factory, request, listener, options)
    val c4 = factory.connections.last()
    c4.open("u1", 0)
    ws2.close(4000, "app")
    c4.listener.onClosing(c4, 4000, "app")
    expect("echoed 4000", callbacks(), listOf("open resumed=false", "closed 4000 app"))
    expect("connections in all", factory.connections.size, 4)
    println("resume-now OK")
}
