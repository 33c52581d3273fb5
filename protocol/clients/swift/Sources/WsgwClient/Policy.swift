import Foundation

/// The gateway's answers, mapped to what the client does next: the README's
/// tables ("Close codes", the HTTP refusals, the mobile client guide).
/// (Kotlin: `Policy.kt`, same names, same order.)
enum Policy {
    /// What a close frame from the gateway on the live connection means.
    enum AfterClose {
        /// The session goes on: resume it at once, without backoff, as after a lost connection.
        case resumeNow
        /// The session is over and reconnecting would not help.
        case end
        /// The session is over; start a new one at once (another instance answers).
        case newSessionNow
        /// The session is over; start a new one after a backoff delay.
        case newSessionLater
    }

    /// The reason the gateway gives with 1008 when a newer connection took the session.
    static let takenOver = "session resumed on another connection"

    /// "Resume now": the gateway's own code, never a backend's (the gateway turns a backend's 4000 into 1011).
    static let resumeNow = 4000

    /// README "Close codes": every code the gateway sends, and whether to reconnect.
    static func afterClose(code: Int, reason: String) -> AfterClose {
        switch code {
        // A fleet instance going away (a deploy) keeps the session for
        // another instance to take over: the load balancer sends the resume
        // there.
        case resumeNow: return .resumeNow
        // Drain: this instance stops, another one takes new sessions.
        case 1001: return .newSessionNow
        // Slow consumer, or the backend's policy code; not after a takeover:
        // the newer connection has the session.
        case 1008: return reason == takenOver ? .end : .newSessionLater
        // Backend trouble, lost link, try again later, bad gateway.
        case 1011, 1012, 1013, 1014: return .newSessionLater
        // 1000, 1002/1007 (a client bug), 1003, 1009, 3000-3999 and
        // 4001-4999 (the app decides), and anything the table does not list.
        default: return .end
        }
    }

    /// What an HTTP answer other than 101 to an upgrade means.
    enum AfterRefusal {
        /// The session cannot be resumed: start a new one and resync (410, or 400 to a resume).
        case sessionLost
        /// Try the same request again after a backoff delay.
        case retry
        /// A configuration or client error that retrying cannot fix.
        case end
    }

    /// README "Before the upgrade, refusals are HTTP".
    static func afterRefusal(status: Int, resuming: Bool) -> AfterRefusal {
        if status == 410 { return .sessionLost }
        if status == 400 && resuming { return .sessionLost }
        if status == 101 || status == 408 || status == 429 || status >= 500 { return .retry }
        return .end
    }

    /// The guide's backoff: `min(max, base * 2^attempt)` times a random
    /// factor in [0.5, 1) ("equal jitter").
    static func backoff(attempt: Int, base: TimeInterval, max: TimeInterval) -> TimeInterval {
        let full = Swift.min(max, base * pow(2, Double(Swift.min(attempt, 30))))
        return full * Double.random(in: 0.5..<1)
    }
}
