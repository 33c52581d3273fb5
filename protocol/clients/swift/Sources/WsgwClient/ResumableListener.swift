import Foundation

/// What a `ResumableWebSocket` tells the app. Every method has an empty
/// default. Callbacks arrive one at a time, in order, on
/// `Options.callbackQueue`, never while the library holds its lock.
/// (Kotlin: `ResumableListener.kt`; the same methods.)
public protocol ResumableListener: AnyObject {
    /// A connection opened: a new session (`resumed` false) or the same one resumed.
    func onOpen(_ ws: ResumableWebSocket, resumed: Bool)
    /// A text message from the backend, exactly once and in order.
    func onMessage(_ ws: ResumableWebSocket, text: String)
    /// A binary message from the backend, exactly once and in order.
    func onMessage(_ ws: ResumableWebSocket, data: Data)
    /// The connection was lost, or the gateway asked for a resume (close
    /// 4000, "resume now": `error` nil, `retryIn` 0); the library resumes
    /// in `retryIn` seconds.
    func onDisconnected(_ ws: ResumableWebSocket, error: Error?, retryIn: TimeInterval)
    /// The session could not be continued; a new one has started: resync.
    /// `unconfirmed` may or may not have reached the backend; not resent.
    func onSessionLost(_ ws: ResumableWebSocket, reason: String, unconfirmed: [Message])
    /// The session ended with a close frame and will not be reconnected. The last callback.
    func onClosed(_ ws: ResumableWebSocket, code: Int, reason: String)
    /// The session ended without a close frame and will not be reconnected. The last callback.
    func onFailure(_ ws: ResumableWebSocket, error: Error, response: HTTPURLResponse?)
}

public extension ResumableListener {
    func onOpen(_ ws: ResumableWebSocket, resumed: Bool) {}
    func onMessage(_ ws: ResumableWebSocket, text: String) {}
    func onMessage(_ ws: ResumableWebSocket, data: Data) {}
    func onDisconnected(_ ws: ResumableWebSocket, error: Error?, retryIn: TimeInterval) {}
    func onSessionLost(_ ws: ResumableWebSocket, reason: String, unconfirmed: [Message]) {}
    func onClosed(_ ws: ResumableWebSocket, code: Int, reason: String) {}
    func onFailure(_ ws: ResumableWebSocket, error: Error, response: HTTPURLResponse?) {}
}

/// Settings; the defaults follow the README's guide. (Kotlin: `Options.kt`.)
public struct Options {
    /// How often the client pings. URLSessionWebSocketTask does not ping by
    /// itself: without pings a connection left dead by a network change is
    /// noticed only when the app next sends. 10 s: below `handshakeTimeout`,
    /// which as the request's `timeoutInterval` also ends a connection
    /// that has received nothing for that long, so an idle connection's
    /// pong comes back in time. (Kotlin: 15 s, OkHttp has no such timeout
    /// once open.)
    public var pingInterval: TimeInterval = 10
    /// Timeout of the upgrade request: above the gateway's `resume.handoff_timeout` (10 s).
    public var handshakeTimeout: TimeInterval = 15
    /// First reconnect delay (before jitter); doubled per failed attempt.
    public var backoffBase: TimeInterval = 0.5
    /// Longest reconnect delay (before jitter).
    public var backoffMax: TimeInterval = 30
    /// After this many bytes sent on one connection, resume on a fresh one to trim the outbox.
    public var outboxTrimBytes: Int = 1 << 20
    /// Most bytes the outbox holds: past it, `send` returns false. (Kotlin
    /// caps it at OkHttp's 16 MiB queue limit; URLSession has no such limit.)
    public var maxOutboxBytes: Int = 16 << 20
    /// Largest message received: the gateway's `session.max_message_size` (1 MiB by default).
    public var maximumMessageSize: Int = 1 << 20
    /// Where callbacks run (a serial queue; `.main` is fine).
    public var callbackQueue: DispatchQueue = DispatchQueue(label: "wsgw callbacks")

    public init() {}
}

/// Errors the library reports through `onFailure`.
public enum ResumableError: Error {
    /// The 101 had no `X-Wsgw-Resume`/`X-Wsgw-Received`: resume is off at the gateway.
    case noResumeHeaders
    /// The upgrade was refused in a way retrying cannot fix.
    case refused(status: Int)
    /// The session was lost before the app's close completed.
    case lostWhileClosing(String)
}
