// One Kotlin client session for tests/tests/kotlin_client.rs to drive step
// by step: it prints each callback as a line on stdout and reads commands
// from stdin (`send TEXT`, `cut`, `close CODE`, `close-long-reason`), so that the test can have
// its backend close the session with a given code, or make the gateway
// answer 410, and see what the library does next.
package wsgw.client.scenario

import okhttp3.Request
import okhttp3.Response
import okio.ByteString
import wsgw.client.CuttableFactory
import wsgw.client.Message
import wsgw.client.Options
import wsgw.client.ProxySockets
import wsgw.client.ResumableListener
import wsgw.client.ResumableWebSocket
import wsgw.client.trustingClient

object ScenarioOut {
    @Synchronized
    fun say(line: String) {
        println(line)
        System.out.flush()
    }
}

fun main(args: Array<String>) {
    val a = args.toList().chunked(2).associate { it[0].removePrefix("--") to it[1] }
    val options = Options()
    options.backoffBaseMillis = a["backoff-ms"]?.toLong() ?: 500L
    val http = ResumableWebSocket.forWebSockets(trustingClient(a.getValue("ca"), ProxySockets(0, 0.0, 1)), options)
    val factory = CuttableFactory(http)
    val done = java.util.concurrent.CountDownLatch(1)
    val ws = ResumableWebSocket.connect(factory, Request.Builder().url(a.getValue("url")).build(), object : ResumableListener() {
        override fun onOpen(ws: ResumableWebSocket, resumed: Boolean) = ScenarioOut.say("open resumed=$resumed")
        override fun onMessage(ws: ResumableWebSocket, text: String) = ScenarioOut.say("text $text")
        override fun onMessage(ws: ResumableWebSocket, bytes: ByteString) = ScenarioOut.say("binary ${bytes.size()}")
        override fun onDisconnected(ws: ResumableWebSocket, t: Throwable?, retryInMillis: Long) =
            ScenarioOut.say("disconnected $t")
        override fun onSessionLost(ws: ResumableWebSocket, reason: String, unconfirmed: List<Message>) =
            ScenarioOut.say("lost ${unconfirmed.size} $reason")
        override fun onClosed(ws: ResumableWebSocket, code: Int, reason: String) {
            ScenarioOut.say("closed $code $reason")
            done.countDown()
        }
        override fun onFailure(ws: ResumableWebSocket, t: Throwable, response: Response?) {
            ScenarioOut.say("failure ${response?.code()} $t")
            done.countDown()
        }
    }, options)
    val commands = Thread {
        while (true) {
            val line = readLine() ?: break
            val (cmd, arg) = line.split(' ', limit = 2).let { it[0] to it.getOrElse(1) { "" } }
            when (cmd) {
                "send" -> ws.send(arg)
                "cut" -> factory.latest?.ws?.cancel()
                "close" -> ws.close(arg.toInt(), "bye")
                // A reason OkHttp cannot send: refused before the session changes.
                "close-long-reason" -> try {
                    ws.close(1000, "x".repeat(124))
                    ScenarioOut.say("close accepted")
                } catch (e: IllegalArgumentException) {
                    ScenarioOut.say("close refused")
                }
            }
        }
    }
    commands.isDaemon = true
    commands.start()
    done.await()
    // Whatever the library would still do, it would do within this time.
    Thread.sleep(1500)
    ScenarioOut.say("end")
    System.exit(0)
}
