package wsgw.client

import okhttp3.OkHttpClient
import okhttp3.Response
import okio.ByteString

// The only calls whose Kotlin spelling differs between OkHttp 3.x / okio 1.x
// (what this library is built and tested with: Debian's 3.13.1 and 1.16)
// and OkHttp 4+ / okio 2+, where Kotlin callers must use properties. The
// JVM methods are the same in both, so a jar built from these sources runs
// with either; to compile the sources against OkHttp 4+, use the spelling
// in each comment.

/** The HTTP status. OkHttp 4+: `r.code`. */
internal fun statusOf(r: Response): Int = r.code()

/** The client's ping interval, 0 for none. OkHttp 4+: `c.pingIntervalMillis`. */
internal fun pingIntervalOf(c: OkHttpClient): Int = c.pingIntervalMillis()

/** The client's read timeout, 0 for none. OkHttp 4+: `c.readTimeoutMillis`. */
internal fun readTimeoutOf(c: OkHttpClient): Int = c.readTimeoutMillis()

/** Bytes in `b`. okio 2+: `b.size`. */
internal fun sizeOf(b: ByteString): Int = b.size()

/** Bytes of `s` in UTF-8 (no okio call: its spelling changed too). */
internal fun utf8Size(s: String): Long {
    var n = 0L
    var i = 0
    while (i < s.length) {
        val c = s[i]
        n += when {
            c.toInt() < 0x80 -> 1
            c.toInt() < 0x800 -> 2
            Character.isHighSurrogate(c) && i + 1 < s.length && Character.isLowSurrogate(s[i + 1]) -> { i++; 4 }
            else -> 3
        }
        i++
    }
    return n
}
