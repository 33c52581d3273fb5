import Foundation

/// A WebSocket session through the wsgw gateway that survives lost
/// connections: every message arrives exactly once, in order, with its type,
/// in both directions (README, "Mobile client guide").
///
/// The Swift twin of `protocol/clients/kotlin/.../ResumableWebSocket.kt`:
/// the same fields, the same events, in the same order, so that a fix to
/// one can be carried to the other line by line.
///
/// ```
/// let ws = ResumableWebSocket.connect(request: URLRequest(url: url), listener: self)
/// ws.send(text: "hello")     // queued while disconnected, resent after a resume
/// ws.close(code: 1000, reason: "bye")
/// ```
public final class ResumableWebSocket: NSObject, URLSessionWebSocketDelegate {
    /// Request header: `new`, or the token to resume; response header: the next token.
    public static let resumeHeader = "X-Wsgw-Resume"
    /// Request header: data messages received; response header: ours the gateway has.
    public static let receivedHeader = "X-Wsgw-Received"
    /// Response header: how long the gateway keeps a detached session, in
    /// ms. Informational: the library lets the gateway's 410 decide.
    public static let graceHeader = "X-Wsgw-Grace-Ms"
    /// RFC 6455 5.5: a control frame's payload is at most 125 bytes, 2 of them the code.
    public static let maxCloseReasonBytes = 123
    /// A connection that stayed open this long worked, data or not: the
    /// backoff starts over. (Kotlin: `STABLE_MILLIS`.)
    private static let stableInterval: TimeInterval = 5

    private let request: URLRequest
    // Held strongly until the session is over, as OkHttp holds its listener.
    private var listener: ResumableListener?
    private let opts: Options
    private var urlSession: URLSession!

    // # Concurrency
    //
    // URLSession calls back on its delegate queue (serial, below), the app
    // calls send/close/reconnect on any thread, and timers fire on a global
    // queue. Every field below is read and written only with `lock` held,
    // so each event is one step of the state machine: a resend on open
    // cannot interleave with a new send, and a count cannot change between
    // a stale check and the next resume's X-Wsgw-Received. NSLock is not
    // reentrant: `...Locked` functions expect it held and never take it.
    // App callbacks are queued, in order, with the lock held (`post`).
    private let lock = NSLock()

    /// The resume token of the session; nil before the first 101 of a session.
    private var token: String?
    /// Data messages (text and binary) of this session handed to the app.
    private var received: Int64 = 0
    /// Our messages the gateway has confirmed (its last `X-Wsgw-Received`).
    private var confirmed: Int64 = 0
    /// Messages sent but not confirmed, oldest first; number `confirmed` is the head.
    private var outbox: [Message] = []
    private var outboxBytes = 0
    /// Bytes of new messages sent on the current connection (for outbox trimming).
    private var sentSinceOpen = 0
    /// The connection whose callbacks count; every other one is stale.
    private var current: URLSessionWebSocketTask?
    /// `current` has opened (its 101 was seen and handled).
    private var open = false
    /// Sends on `current` whose completion has not come back: the close
    /// frame waits for them (`cancel(with:)` would not).
    private var sendsInFlight = 0
    /// Open connections replaced by `reconnect`, cancelled once the new one opens or fails.
    private var abandoned: [URLSessionWebSocketTask] = []
    /// When `current` opened (system uptime); meaningful while `open`.
    private var openedAt: TimeInterval = 0
    /// `current` has delivered a message to the app since it opened.
    private var deliveredSinceOpen = false
    /// Attempts since the last connection that worked (see
    /// `connectionEndedLocked`): the backoff exponent.
    private var attempt = 0
    /// Resumes started because `Options.outboxTrimBytes` were sent on one connection.
    private var trims: Int64 = 0
    private var timer: DispatchWorkItem?
    private var closing = false
    private var closeCode = 0
    private var closeReason: String?
    /// The session is over: no more connections, no more callbacks after the last one.
    private var finished = false
    /// `cancel()` was called: callbacks already queued are skipped.
    private var cancelled = false
    /// A ping is out on `current` and its pong has not come back.
    private var awaitingPong = false
    private var pinger: DispatchSourceTimer?

    private init(request: URLRequest, listener: ResumableListener, options: Options, configuration: URLSessionConfiguration) {
        self.request = request
        self.listener = listener
        self.opts = options
        super.init()
        let queue = OperationQueue()
        queue.maxConcurrentOperationCount = 1
        urlSession = URLSession(configuration: configuration, delegate: self, delegateQueue: queue)
    }

    /// Opens a resumable session. `configuration` is the app's (TLS trust,
    /// proxies); the library sets the request's timeout and headers.
    public static func connect(
        request: URLRequest,
        listener: ResumableListener,
        options: Options = Options(),
        configuration: URLSessionConfiguration = .default
    ) -> ResumableWebSocket {
        let ws = ResumableWebSocket(request: request, listener: listener, options: options, configuration: configuration)
        ws.start()
        return ws
    }

    /// The current connection is open: sends go out now rather than at the next resume.
    public var isOpen: Bool { lock.lock(); defer { lock.unlock() }; return open }

    /// Messages of this session delivered to the app so far.
    public var receivedCount: Int64 { lock.lock(); defer { lock.unlock() }; return received }

    /// Messages sent but not yet confirmed by the gateway (kept for resending).
    public var unconfirmedCount: Int { lock.lock(); defer { lock.unlock() }; return outbox.count }

    /// Resumes the library started to trim the outbox (`Options.outboxTrimBytes`), for diagnostics.
    public var outboxTrims: Int64 { lock.lock(); defer { lock.unlock() }; return trims }

    /// Sends a text message, now or after the next resume. False if the
    /// session is closing or over, or the outbox is full.
    @discardableResult
    public func send(text: String) -> Bool { enqueue(.text(text)) }

    /// Sends a binary message; as `send(text:)`.
    @discardableResult
    public func send(data: Data) -> Bool { enqueue(.binary(data)) }

    /// Ends the session: what is unconfirmed is sent first (after a resume
    /// if the connection is down), then a close frame. False if already
    /// closing or over.
    ///
    /// `code` must be one an endpoint may send (1000-4999 without 1004-1006
    /// and 1012-2999, the Kotlin library's rule) and `reason` at most 123
    /// bytes in UTF-8: anything else is a programming error and traps,
    /// before the session changes (URLSession would put any code on the
    /// wire).
    @discardableResult
    public func close(code: Int, reason: String?) -> Bool {
        precondition(Self.closeCodeValid(code), "close code \(code) is reserved or out of range")
        precondition((reason?.utf8.count ?? 0) <= Self.maxCloseReasonBytes,
                     "close reason is over \(Self.maxCloseReasonBytes) bytes in UTF-8")
        lock.lock(); defer { lock.unlock() }
        if finished || closing { return false }
        closing = true
        closeCode = code
        closeReason = reason
        if open, let task = current {
            if sendsInFlight == 0 { closeTask(task, code: code, reason: reason) }
            // Otherwise the last send's completion closes (see `sendOn`).
        } else if token == nil && current == nil && outbox.isEmpty {
            // No session exists at the gateway, none is being opened, and
            // nothing the app sent is waiting for one.
            finishLocked { l in l.onClosed(self, code: code, reason: reason ?? "") }
        }
        // Otherwise the connection being opened, or the one the pending
        // retry opens (a new session if the old one was lost), resends the
        // outbox, then closes: accepted messages are never dropped silently.
        return true
    }

    /// Resumes on a new connection now, for example after a network change.
    /// The current connection's callbacks are ignored from now on; it is
    /// cancelled once the new one opens or fails. Does nothing while a
    /// connection is still being opened: unlike OkHttp, URLSession may
    /// answer the gateway's first ping on a 101 it has received before
    /// `didOpenWithProtocol` reaches the library, which voids the token the
    /// next connection would resume with (a 410, a lost session).
    public func reconnect() {
        lock.lock(); defer { lock.unlock() }
        if finished || closing || (current != nil && !open) { return }
        reconnectLocked()
    }

    /// Drops everything at once, without a close frame and without further
    /// callbacks: callbacks queued but not yet run are skipped too (one
    /// already running finishes). The gateway keeps the session until its
    /// grace period ends.
    public func cancel() {
        lock.lock(); defer { lock.unlock() }
        if finished { return }
        finished = true
        cancelled = true
        timer?.cancel()
        current?.cancel()
        current = nil
        open = false
        cancelAbandonedLocked()
        stopPingsLocked()
        urlSession.invalidateAndCancel()
        listener = nil
    }

    private func enqueue(_ m: Message) -> Bool {
        lock.lock(); defer { lock.unlock() }
        if finished || closing || outboxBytes + m.size > opts.maxOutboxBytes { return false }
        outbox.append(m)
        outboxBytes += m.size
        if open, let task = current {
            sendOn(task, m)
            sentSinceOpen += m.size
            if sentSinceOpen >= opts.outboxTrimBytes {
                trims += 1
                reconnectLocked()
            }
        }
        return true
    }

    /// Queues a message on `current`, with its type. A failed send means a
    /// failing connection: cut it, and the resume resends from the outbox.
    /// While closing, the last send's completion sends the close frame:
    /// `cancel(with:)` does not wait for sends still queued.
    private func sendOn(_ task: URLSessionWebSocketTask, _ m: Message) {
        sendsInFlight += 1
        task.send(m.task) { [weak self] error in
            guard let self = self else { return }
            self.lock.lock(); defer { self.lock.unlock() }
            guard task === self.current else { return }
            self.sendsInFlight -= 1
            if error != nil {
                task.cancel()
            } else if self.closing && self.open && self.sendsInFlight == 0 {
                self.closeTask(task, code: self.closeCode, reason: self.closeReason)
            }
        }
    }

    private func start() {
        lock.lock(); defer { lock.unlock() }
        connectLocked()
    }

    private func connectLocked() {
        timer?.cancel()
        timer = nil
        // No resume is skipped by our own clock against X-Wsgw-Grace-Ms: the
        // gateway's grace starts when it notices the loss, which can be
        // ping_interval + ping_timeout (and half a second) after we did, so only its 410 says
        // the session is gone.
        var req = request
        req.timeoutInterval = opts.handshakeTimeout
        if let t = token {
            req.setValue(t, forHTTPHeaderField: Self.resumeHeader)
            req.setValue(String(received), forHTTPHeaderField: Self.receivedHeader)
        } else {
            req.setValue("new", forHTTPHeaderField: Self.resumeHeader)
            req.setValue(nil, forHTTPHeaderField: Self.receivedHeader)
        }
        open = false
        sendsInFlight = 0
        let task = urlSession.webSocketTask(with: req)
        task.maximumMessageSize = opts.maximumMessageSize
        current = task
        task.resume()
    }

    private func reconnectLocked() {
        if let task = current {
            if open {
                connectionEndedLocked()
                abandoned.append(task)
            } else {
                task.cancel()
            }
        }
        current = nil
        open = false
        connectLocked()
    }

    /// Connection lost or refused for now: try again after a backoff delay.
    private func retryLocked(_ error: Error?, atLeast: TimeInterval) {
        let delay = max(Policy.backoff(attempt: attempt, base: opts.backoffBase, max: opts.backoffMax), atLeast)
        attempt += 1
        post { l in l.onDisconnected(self, error: error, retryIn: delay) }
        timer?.cancel()
        let item = DispatchWorkItem { [weak self] in
            guard let self = self else { return }
            self.lock.lock(); defer { self.lock.unlock() }
            if !self.finished && self.current == nil { self.connectLocked() }
        }
        timer = item
        DispatchQueue.global().asyncAfter(deadline: .now() + delay, execute: item)
    }

    /// The open `current` connection ended. If it worked (it delivered a
    /// message, or stayed up `stableInterval`), the backoff starts over;
    /// otherwise a loop of connections that open and drop at once keeps
    /// backing off further.
    private func connectionEndedLocked() {
        if deliveredSinceOpen || ProcessInfo.processInfo.systemUptime - openedAt >= Self.stableInterval {
            attempt = 0
        }
    }

    /// The session cannot go on: forget it, tell the app; the caller starts the next.
    private func sessionLostLocked(_ reason: String) {
        let unconfirmed = outbox
        token = nil
        received = 0
        confirmed = 0
        outbox.removeAll()
        outboxBytes = 0
        post { l in l.onSessionLost(self, reason: reason, unconfirmed: unconfirmed) }
    }

    private func finishLocked(_ last: @escaping (ResumableListener) -> Void) {
        finished = true
        timer?.cancel()
        cancelAbandonedLocked()
        stopPingsLocked()
        post(last)
        // Once the last callback ran, let go of the listener and of the
        // URLSession, which holds its delegate (self) until invalidated.
        opts.callbackQueue.async { [weak self] in
            guard let self = self else { return }
            self.lock.lock(); defer { self.lock.unlock() }
            self.listener = nil
            self.urlSession.finishTasksAndInvalidate()
        }
    }

    private func cancelAbandonedLocked() {
        for task in abandoned { task.cancel() }
        abandoned.removeAll()
    }

    /// Queues an app callback, with the lock held, so callbacks run in the
    /// order the state machine took its steps; the queue is serial. One that
    /// has not started when `cancel()` is called is skipped.
    private func post(_ event: @escaping (ResumableListener) -> Void) {
        guard let l = listener else { return }
        opts.callbackQueue.async { [weak self] in
            guard let self = self else { return }
            self.lock.lock()
            let skip = self.cancelled
            self.lock.unlock()
            if !skip { event(l) }
        }
    }

    /// `code` was checked in `close` (or is 1000); the imported NS_ENUM
    /// takes any raw value, application codes included.
    private func closeTask(_ task: URLSessionWebSocketTask, code: Int, reason: String?) {
        let c = URLSessionWebSocketTask.CloseCode(rawValue: code) ?? .normalClosure
        task.cancel(with: c, reason: reason?.data(using: .utf8))
    }

    /// OkHttp 3.x's rule for the codes an endpoint may send (Kotlin: `closeCodeValid`).
    private static func closeCodeValid(_ code: Int) -> Bool {
        (1000...4999).contains(code) && !(1004...1006).contains(code) && !(1012...2999).contains(code)
    }

    // MARK: pings (OkHttp's pingInterval, which URLSessionWebSocketTask lacks)

    private func startPingsLocked() {
        stopPingsLocked()
        guard opts.pingInterval > 0 else { return }
        let t = DispatchSource.makeTimerSource(queue: DispatchQueue.global())
        t.schedule(deadline: .now() + opts.pingInterval, repeating: opts.pingInterval)
        t.setEventHandler { [weak self] in self?.pingTick() }
        pinger = t
        t.resume()
    }

    private func stopPingsLocked() {
        pinger?.cancel()
        pinger = nil
        awaitingPong = false
    }

    private func pingTick() {
        lock.lock(); defer { lock.unlock() }
        guard open, let task = current else { return }
        if awaitingPong {
            // No pong within an interval: the connection is dead. Cutting it
            // makes URLSession report a failure, and the session resumes.
            task.cancel()
            return
        }
        awaitingPong = true
        task.sendPing { [weak self] error in
            guard let self = self, error == nil else { return }
            self.lock.lock(); defer { self.lock.unlock() }
            if task === self.current { self.awaitingPong = false }
        }
    }

    // MARK: one connection's events; those of a stale connection are ignored

    public func urlSession(_ session: URLSession, webSocketTask: URLSessionWebSocketTask, didOpenWithProtocol protocol: String?) {
        lock.lock(); defer { lock.unlock() }
        guard webSocketTask === current, !finished else {
            // Replaced while connecting: close it before it sends a frame
            // (a frame would void the token we still hold).
            webSocketTask.cancel()
            return
        }
        let response = webSocketTask.response as? HTTPURLResponse
        guard let newToken = response?.value(forHTTPHeaderField: Self.resumeHeader),
              let theirs = response?.value(forHTTPHeaderField: Self.receivedHeader).flatMap({ Int64($0) })
        else {
            webSocketTask.cancel()
            current = nil
            finishLocked { l in l.onFailure(self, error: ResumableError.noResumeHeaders, response: response) }
            return
        }
        if theirs < confirmed || theirs > confirmed + Int64(outbox.count) {
            // Resending from here would lose or duplicate messages.
            webSocketTask.cancel()
            current = nil
            sessionLostLocked("the gateway has \(theirs) of our messages; we sent \(confirmed + Int64(outbox.count)), \(confirmed) confirmed")
            connectLocked()
            return
        }
        let resumed = token != nil
        let drop = Int(theirs - confirmed)
        outboxBytes -= outbox.prefix(drop).reduce(0) { $0 + $1.size }
        outbox.removeFirst(drop)
        confirmed = theirs
        token = newToken
        open = true
        openedAt = ProcessInfo.processInfo.systemUptime
        deliveredSinceOpen = false
        sentSinceOpen = 0
        cancelAbandonedLocked()
        post { l in l.onOpen(self, resumed: resumed) }
        // The lock keeps new sends out until the resend is queued.
        for m in outbox { sendOn(webSocketTask, m) }
        // With messages resent, the last one's completion closes (`sendOn`).
        if closing && sendsInFlight == 0 { closeTask(webSocketTask, code: closeCode, reason: closeReason) }
        startPingsLocked()
        receiveNext(webSocketTask)
    }

    /// URLSessionWebSocketTask delivers one message per `receive`: ask for
    /// the next only after the app has had this one, so a slow app slows
    /// the connection down instead of filling memory.
    private func receiveNext(_ task: URLSessionWebSocketTask) {
        task.receive { [weak self] result in
            guard let self = self else { return }
            switch result {
            case .success(.string(let s)): self.deliver(task, .text(s))
            case .success(.data(let d)): self.deliver(task, .binary(d))
            case .success: self.receiveNext(task)
            // The receive loop ends here; the task's completion
            // (`didCompleteWithError`, with its close code if a close frame
            // came) decides what happens to the session.
            case .failure: return
            }
        }
    }

    /// A message on the current connection: count it, hand it over.
    private func deliver(_ task: URLSessionWebSocketTask, _ m: Message) {
        lock.lock(); defer { lock.unlock() }
        guard task === current, !finished else { return }
        received += 1
        deliveredSinceOpen = true
        post { [weak self] l in
            guard let self = self else { return }
            switch m {
            case .text(let s): l.onMessage(self, text: s)
            case .binary(let d): l.onMessage(self, data: d)
            }
            self.receiveNext(task)
        }
    }

    public func urlSession(_ session: URLSession, webSocketTask: URLSessionWebSocketTask, didCloseWith closeCode: URLSessionWebSocketTask.CloseCode, reason: Data?) {
        lock.lock(); defer { lock.unlock() }
        closedLocked(webSocketTask, code: closeCode.rawValue, reason: reason)
    }

    /// A close frame came on `webSocketTask` (from `didCloseWith`, or seen
    /// as the task's close code when it completed first).
    private func closedLocked(_ webSocketTask: URLSessionWebSocketTask, code: Int, reason: Data?) {
        guard webSocketTask === current else {
            webSocketTask.cancel()
            return
        }
        let why = reason.flatMap { String(data: $0, encoding: .utf8) } ?? ""
        // Answer the close frame, as OkHttp must be told to.
        webSocketTask.cancel(with: .normalClosure, reason: nil)
        if open { connectionEndedLocked() }
        current = nil
        open = false
        stopPingsLocked()
        if finished { return }
        let next = Policy.afterClose(code: code, reason: why)
        // While closing, the gateway's close frame answers ours, unless
        // it is a 4000 that crossed it (not the echo of our own 4000):
        // the instance handed the session off before it read our close.
        // The resume then resends the outbox and closes (didOpenWithProtocol).
        if closing && (next != .resumeNow || code == closeCode) {
            finishLocked { l in l.onClosed(self, code: code, reason: why) }
            return
        }
        switch next {
        // As after a lost connection, with the same token, counts and
        // outbox, but at once: the gateway asked for it.
        case .resumeNow:
            post { l in l.onDisconnected(self, error: nil, retryIn: 0) }
            connectLocked()
        case .end:
            finishLocked { l in l.onClosed(self, code: code, reason: why) }
        case .newSessionNow:
            sessionLostLocked("closed by the gateway: \(code) \(why)")
            connectLocked()
        case .newSessionLater:
            sessionLostLocked("closed by the gateway: \(code) \(why)")
            retryLocked(nil, atLeast: 0)
        }
    }

    public func urlSession(_ session: URLSession, task: URLSessionTask, didCompleteWithError error: Error?) {
        guard let ws = task as? URLSessionWebSocketTask else { return }
        failed(ws, error: error, response: task.response as? HTTPURLResponse)
    }

    private func failed(_ task: URLSessionWebSocketTask, error: Error?, response: HTTPURLResponse?) {
        lock.lock(); defer { lock.unlock() }
        abandoned.removeAll { $0 === task }
        guard task === current else { return }
        if task.closeCode != .invalid {
            // A close frame came, and the task completed before (or
            // without) `didCloseWith`: it ends the session, by the close-code
            // table, like any close frame; resuming would only get a 410
            // (except after 4000, where the table says resume).
            closedLocked(task, code: task.closeCode.rawValue, reason: task.closeReason)
            return
        }
        let wasOpen = open
        if wasOpen { connectionEndedLocked() }
        current = nil
        open = false
        stopPingsLocked()
        cancelAbandonedLocked()
        if finished { return }
        if let response = response, !wasOpen {
            let status = response.statusCode
            switch Policy.afterRefusal(status: status, resuming: token != nil) {
            case .sessionLost:
                if closing {
                    finishLocked { l in
                        l.onFailure(self, error: ResumableError.lostWhileClosing("HTTP \(status)"), response: response)
                    }
                } else {
                    sessionLostLocked("HTTP \(status) to the resume")
                    connectLocked()
                }
            case .end:
                finishLocked { l in l.onFailure(self, error: ResumableError.refused(status: status), response: response) }
            case .retry:
                let after = response.value(forHTTPHeaderField: "Retry-After").flatMap { Double($0) } ?? 0
                retryLocked(error, atLeast: min(max(after, 0), 300))
            }
            return
        }
        // No 101 seen (a cut handshake) keeps the old token and counts: the
        // gateway keeps it valid until our first frame on a new connection.
        retryLocked(error, atLeast: 0)
    }
}
