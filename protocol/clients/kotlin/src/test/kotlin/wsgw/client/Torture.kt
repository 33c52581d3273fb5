// The Kotlin client's torture run, driven by tests/tests/kotlin_client.rs
// against the real gateway and the reference echo backend: many sessions
// exchange numbered messages of both types while their connections are cut
// at random (OkHttp's cancel(): no close frame, at any moment, also while
// connecting), taken over (reconnect() while the old connection is open)
// and, through the test's proxy, resumed with handshakes whose 101 never
// arrives. Every echo must come back exactly once, in order, with its type
// and its bytes. Prints one JSON line of totals; exits 1 if any is wrong.
package wsgw.client

import java.io.FileInputStream
import java.net.InetSocketAddress
import java.net.Socket
import java.net.SocketAddress
import java.security.KeyStore
import java.security.cert.CertificateFactory
import java.util.BitSet
import java.util.Random
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicLong
import javax.net.SocketFactory
import javax.net.ssl.SSLContext
import javax.net.ssl.TrustManagerFactory
import javax.net.ssl.X509TrustManager
import okhttp3.OkHttpClient
import okhttp3.Request
import okhttp3.Response
import okhttp3.WebSocket
import okhttp3.WebSocketListener
import okio.ByteString

/** Totals over all clients. */
object Totals {
    val sent = AtomicLong()
    val echoes = AtomicLong()
    val cutsOpen = AtomicLong()
    val cutsConnecting = AtomicLong()
    val takeovers = AtomicLong()
    val proxied = AtomicLong()
    val connections = AtomicLong()
    val opens = AtomicLong()
    val resumes = AtomicLong()
    val trims = AtomicLong()
    val lost = AtomicLong()
    val duplicated = AtomicLong()
    val reordered = AtomicLong()
    val typeChanges = AtomicLong()
    val corrupted = AtomicLong()
    val sessionsLost = AtomicLong()
    val failures = AtomicLong()
    val unfinished = AtomicLong()
    val badCloses = AtomicLong()
}

fun complain(msg: String) {
    System.err.println("torture: $msg")
}

/** An OkHttp client that trusts only the test's CA (PEM), as an app pinning its own CA would. */
fun trustingClient(caPem: String, sockets: SocketFactory): OkHttpClient {
    val certs = FileInputStream(caPem).use { CertificateFactory.getInstance("X.509").generateCertificates(it) }
    val store = KeyStore.getInstance(KeyStore.getDefaultType())
    store.load(null, null)
    certs.forEachIndexed { i, c -> store.setCertificateEntry("ca$i", c) }
    val tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm())
    tmf.init(store)
    val tm = tmf.trustManagers.filterIsInstance<X509TrustManager>().first()
    val ctx = SSLContext.getInstance("TLS")
    ctx.init(null, arrayOf(tm), null)
    return OkHttpClient.Builder()
        .sslSocketFactory(ctx.socketFactory, tm)
        .socketFactory(sockets)
        .build()
}

/**
 * Sends a share of the connections to the test's proxy instead of the
 * gateway; the proxy passes new sessions through and cuts every resume
 * right after the gateway answered 101, before the client sees it.
 */
class ProxySockets(private val proxyPort: Int, private val share: Double, seed: Long) : SocketFactory() {
    private val rng = Random(seed)

    private fun pick(): Boolean = synchronized(rng) { rng.nextDouble() < share }

    override fun createSocket(): Socket = object : Socket() {
        override fun connect(endpoint: SocketAddress, timeout: Int) {
            val to = endpoint as InetSocketAddress
            if (proxyPort > 0 && pick()) {
                Totals.proxied.incrementAndGet()
                super.connect(InetSocketAddress(to.address, proxyPort), timeout)
            } else {
                super.connect(endpoint, timeout)
            }
        }
    }

    override fun createSocket(host: String, port: Int): Socket = throw UnsupportedOperationException()
    override fun createSocket(host: String, port: Int, local: java.net.InetAddress, localPort: Int): Socket =
        throw UnsupportedOperationException()
    override fun createSocket(host: java.net.InetAddress, port: Int): Socket = throw UnsupportedOperationException()
    override fun createSocket(a: java.net.InetAddress, p: Int, l: java.net.InetAddress, lp: Int): Socket =
        throw UnsupportedOperationException()
}

/** One OkHttp connection as the test sees it, to cut it with cancel(). */
class Tracked(@Volatile var ws: WebSocket?) {
    @Volatile var opened = false
    @Volatile var done = false
}

/** Hands the library OkHttp connections and keeps the newest, so the test can cancel() it. */
class CuttableFactory(private val client: OkHttpClient) : WebSocket.Factory {
    @Volatile var latest: Tracked? = null

    override fun newWebSocket(request: Request, listener: WebSocketListener): WebSocket {
        Totals.connections.incrementAndGet()
        val t = Tracked(null)
        val ws = client.newWebSocket(request, object : WebSocketListener() {
            override fun onOpen(webSocket: WebSocket, response: Response) {
                t.opened = true
                listener.onOpen(webSocket, response)
            }
            override fun onMessage(webSocket: WebSocket, text: String) = listener.onMessage(webSocket, text)
            override fun onMessage(webSocket: WebSocket, bytes: ByteString) = listener.onMessage(webSocket, bytes)
            override fun onClosing(webSocket: WebSocket, code: Int, reason: String) {
                t.done = true
                listener.onClosing(webSocket, code, reason)
            }
            override fun onClosed(webSocket: WebSocket, code: Int, reason: String) = listener.onClosed(webSocket, code, reason)
            override fun onFailure(webSocket: WebSocket, t2: Throwable, response: Response?) {
                t.done = true
                listener.onFailure(webSocket, t2, response)
            }
        })
        t.ws = ws
        latest = t
        return ws
    }
}

/** The bytes of message `seq` of client `id`: tagged, and of a size that varies. */
fun body(id: Int, seq: Int, big: Boolean): String {
    val pad = if (big) 8000 + (seq * 7919 + id) % 24000 else (seq * 104729 + id * 31) % 300
    val sb = StringBuilder("$id:$seq:")
    for (k in 0 until pad) sb.append(('a' + (seq + k) % 26))
    return sb.toString()
}

class Client(
    private val id: Int,
    private val url: String,
    private val factory: CuttableFactory,
    private val messages: Int,
    private val seed: Long,
    private val options: Options
) {
    private val rng = Random(seed)
    private val binary = BooleanArray(messages)
    private val big = BooleanArray(messages)
    private val seen = BitSet(messages)
    private var highest = -1
    private val closed = CountDownLatch(1)
    private val echoed = java.util.concurrent.atomic.AtomicInteger()

    private fun received(seq: Int, asBinary: Boolean, text: String) {
        if (seq < 0 || seq >= messages) {
            Totals.corrupted.incrementAndGet()
            complain("client $id: echo with sequence $seq")
            return
        }
        if (seen.get(seq)) {
            Totals.duplicated.incrementAndGet()
            complain("client $id: echo $seq twice")
            return
        }
        if (seq < highest) {
            Totals.reordered.incrementAndGet()
            complain("client $id: echo $seq after $highest")
        }
        if (asBinary != binary[seq]) {
            Totals.typeChanges.incrementAndGet()
            complain("client $id: echo $seq came back as ${if (asBinary) "binary" else "text"}")
        }
        if (text != body(id, seq, big[seq])) {
            Totals.corrupted.incrementAndGet()
            complain("client $id: echo $seq has other bytes")
        }
        seen.set(seq)
        highest = maxOf(highest, seq)
        echoed.incrementAndGet()
        Totals.echoes.incrementAndGet()
    }

    private fun parse(text: String, asBinary: Boolean) {
        val parts = text.split(':', limit = 3)
        val who = parts.getOrNull(0)?.toIntOrNull()
        val seq = parts.getOrNull(1)?.toIntOrNull()
        if (who != id || seq == null) {
            Totals.corrupted.incrementAndGet()
            complain("client $id: unexpected echo ${text.take(40)}")
            return
        }
        received(seq, asBinary, text)
    }

    private val listener = object : ResumableListener() {
        override fun onOpen(ws: ResumableWebSocket, resumed: Boolean) {
            Totals.opens.incrementAndGet()
            if (resumed) Totals.resumes.incrementAndGet()
        }

        override fun onMessage(ws: ResumableWebSocket, text: String) = parse(text, false)

        override fun onMessage(ws: ResumableWebSocket, bytes: ByteString) {
            // Binary messages start with 0xFF (never in UTF-8): one without
            // it is a text message that came back as binary.
            if (bytes.size() > 0 && bytes.getByte(0) == 0xFF.toByte()) {
                parse(bytes.substring(1).utf8(), true)
            } else {
                parse(bytes.utf8(), true)
            }
        }

        override fun onSessionLost(ws: ResumableWebSocket, reason: String, unconfirmed: List<Message>) {
            Totals.sessionsLost.incrementAndGet()
            complain("client $id: session lost: $reason")
        }

        override fun onClosed(ws: ResumableWebSocket, code: Int, reason: String) {
            // Only the app's own close(1000) may end a session here.
            if (code != 1000) {
                Totals.badCloses.incrementAndGet()
                complain("client $id: closed $code $reason")
            }
            closed.countDown()
        }

        override fun onFailure(ws: ResumableWebSocket, t: Throwable, response: Response?) {
            Totals.failures.incrementAndGet()
            complain("client $id: failed: $t ${response?.code()}")
            closed.countDown()
        }
    }

    /**
     * Sends every message, at most `window` ahead of the echoes, so that the
     * run spans many connections; rolls for a cut or a takeover at every
     * step, also while waiting for echoes.
     */
    fun run(cutEvery: Int, takeoverEvery: Int, window: Int) {
        val ws = ResumableWebSocket.connect(factory, Request.Builder().url(url).build(), listener, options)
        val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(90)
        var seq = 0
        while (echoed.get() < messages && System.nanoTime() < deadline) {
            if (seq < messages && seq - echoed.get() < window) {
                send(ws, seq)
                seq++
                if (rng.nextInt(4) == 0) Thread.sleep(rng.nextInt(4).toLong())
            } else {
                Thread.sleep(2)
            }
            if (rng.nextInt(cutEvery) == 0) cut()
            if (rng.nextInt(takeoverEvery) == 0 && ws.isOpen) {
                Totals.takeovers.incrementAndGet()
                ws.reconnect()
            }
        }
        if (echoed.get() < messages) {
            Totals.unfinished.incrementAndGet()
            complain("client $id: ${echoed.get()} of $messages echoes after 90 s (sent $seq, unconfirmed ${ws.unconfirmedCount}, open ${ws.isOpen})")
        }
        // Late duplicates would show up here.
        Thread.sleep(200)
        ws.close(1000, "done")
        if (!closed.await(30, TimeUnit.SECONDS)) {
            Totals.unfinished.incrementAndGet()
            complain("client $id: no close after 30 s")
            ws.cancel()
        }
        Totals.lost.addAndGet((messages - seen.cardinality()).toLong())
        Totals.trims.addAndGet(ws.outboxTrims)
    }

    private fun send(ws: ResumableWebSocket, seq: Int) {
        binary[seq] = rng.nextBoolean()
        big[seq] = rng.nextInt(60) == 0
        val text = body(id, seq, big[seq])
        val ok = if (binary[seq]) {
            ws.send(okio.Buffer().writeByte(0xFF).writeUtf8(text).readByteString())
        } else {
            ws.send(text)
        }
        if (!ok) {
            Totals.failures.incrementAndGet()
            complain("client $id: send $seq refused")
        }
        Totals.sent.incrementAndGet()
    }

    /** Cuts the newest connection without a close frame: open, or still connecting. */
    private fun cut() {
        val t = factory.latest ?: return
        val ws = t.ws ?: return
        if (t.done) return
        if (t.opened) Totals.cutsOpen.incrementAndGet() else Totals.cutsConnecting.incrementAndGet()
        ws.cancel()
    }
}

fun main(args: Array<String>) {
    val a = args.toList().chunked(2).associate { it[0].removePrefix("--") to it[1] }
    val url = a.getValue("url")
    val clients = a["clients"]?.toInt() ?: 20
    val messages = a["messages"]?.toInt() ?: 1000
    val seed = a["seed"]?.toLong() ?: 1L
    val options = Options()
    // Shorter than an app's, so that a run has hundreds of cuts in a minute.
    options.backoffBaseMillis = a["backoff-ms"]?.toLong() ?: 100L
    options.backoffMaxMillis = 2_000
    // Small, so that outbox trimming (a resume on a fresh connection) happens
    // often: a client sends about 0.5 MB, and most connections live for tens
    // of messages, so at 1 MiB (the default) no connection would ever trim.
    options.outboxTrimBytes = 16L shl 10
    val sockets = ProxySockets(a["proxy-port"]?.toInt() ?: 0, a["proxy-share"]?.toDouble() ?: 0.1, seed)
    val http = ResumableWebSocket.forWebSockets(trustingClient(a.getValue("ca"), sockets), options)
    val start = System.nanoTime()
    val threads = (0 until clients).map { i ->
        // One OkHttpClient for all, as in an app; one factory per client to cut its connections.
        val c = Client(i, url, CuttableFactory(http), messages, seed * 1_000_003 + i, options)
        Thread({
            c.run(a["cut-every"]?.toInt() ?: 40, a["takeover-every"]?.toInt() ?: 150, a["window"]?.toInt() ?: 40)
        }, "client $i")
    }
    threads.forEach { it.start() }
    threads.forEach { it.join() }
    val t = Totals
    val json = listOf(
        "clients" to clients.toLong(),
        "messages_sent" to t.sent.get(),
        "echoes" to t.echoes.get(),
        "cuts_open" to t.cutsOpen.get(),
        "cuts_connecting" to t.cutsConnecting.get(),
        "takeovers" to t.takeovers.get(),
        "proxied_connections" to t.proxied.get(),
        "connections" to t.connections.get(),
        "opens" to t.opens.get(),
        "resumes" to t.resumes.get(),
        "trims" to t.trims.get(),
        "lost" to t.lost.get(),
        "duplicated" to t.duplicated.get(),
        "reordered" to t.reordered.get(),
        "type_changes" to t.typeChanges.get(),
        "corrupted" to t.corrupted.get(),
        "sessions_lost" to t.sessionsLost.get(),
        "failures" to t.failures.get(),
        "unfinished" to t.unfinished.get(),
        "bad_closes" to t.badCloses.get(),
        "elapsed_ms" to TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - start)
    ).joinToString(",", "{", "}") { "\"${it.first}\":${it.second}" }
    println(json)
    val bad = t.lost.get() + t.duplicated.get() + t.reordered.get() + t.typeChanges.get() +
        t.corrupted.get() + t.sessionsLost.get() + t.failures.get() + t.unfinished.get() + t.badCloses.get()
    System.exit(if (bad == 0L && t.echoes.get() == clients.toLong() * messages) 0 else 1)
}
