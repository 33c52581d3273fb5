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
    /// Response header: how long the gateway keeps a detached session, in ms.
    public static let graceHeader = "X-Wsgw-Grace-Ms"

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
    /// `X-Wsgw-Grace-Ms` of the last 101, in seconds.
    private var grace: TimeInterval = 0
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
    /// Open connections replaced by `reconnect`, cancelled once the new one opens or fails.
    private var abandoned: [URLSessionWebSocketTask] = []
    /// When the last open connection was lost (wall clock: it goes on while
    /// the device sleeps, as the gateway's grace does); nil when connected.
    private var lostAt: Date?
    /// Failed attempts since the last open: the backoff exponent.
    private var attempt = 0
    private var timer: DispatchWorkItem?
    private var closing = false
    private var closeCode = 0
    private var closeReason: String?
    /// The session is over: no more connections, no more callbacks after the last one.
    private var finished = false
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
    @discardableResult
    public func close(code: Int, reason: String?) -> Bool {
        lock.lock(); defer { lock.unlock() }
        if finished || closing { return false }
        closing = true
        closeCode = code
        closeReason = reason
        if open, let task = current {
            closeTask(task, code: code, reason: reason)
        } else if token == nil && current == nil {
            // No session exists at the gateway and none is being opened.
            finishLocked { l in l.onClosed(self, code: code, reason: reason ?? "") }
        }
        // Otherwise the connection being opened resends, then closes.
        return true
    }

    /// Resumes on a new connection now, for example after a network change.
    /// The current connection's callbacks are ignored from now on; it is
    /// cancelled once the new one opens or fails.
    public func reconnect() {
        lock.lock(); defer { lock.unlock() }
        if !finished && !closing { reconnectLocked() }
    }

    /// Drops everything at once, without a close frame and without further
    /// callbacks. The gateway keeps the session until its grace period ends.
    public func cancel() {
        lock.lock(); defer { lock.unlock() }
        if finished { return }
        finished = true
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
            if sentSinceOpen >= opts.outboxTrimBytes { reconnectLocked() }
        }
        return true
    }

    /// Queues a message on a connection, with its type. A failed send means
    /// a failing connection: cut it, and the resume resends from the outbox.
    private func sendOn(_ task: URLSessionWebSocketTask, _ m: Message) {
        task.send(m.task) { error in
            if error != nil { task.cancel() }
        }
    }

    private func start() {
        lock.lock(); defer { lock.unlock() }
        connectLocked()
    }

    private func connectLocked() {
        timer?.cancel()
        timer = nil
        if token != nil, let lost = lostAt, grace > 0, Date().timeIntervalSince(lost) > grace {
            // The gateway has given the session up: skip the 410.
            sessionLostLocked("resume.grace (\(Int(grace * 1000)) ms) passed while disconnected")
        }
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
        let task = urlSession.webSocketTask(with: req)
        task.maximumMessageSize = opts.maximumMessageSize
        current = task
        task.resume()
    }

    private func reconnectLocked() {
        if let task = current {
            if open {
                abandoned.append(task)
                lostAt = Date()
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

    /// The session cannot go on: forget it, tell the app; the caller starts the next.
    private func sessionLostLocked(_ reason: String) {
        let unconfirmed = outbox
        token = nil
        grace = 0
        received = 0
        confirmed = 0
        outbox.removeAll()
        outboxBytes = 0
        lostAt = nil
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
    /// order the state machine took its steps; the queue is serial.
    private func post(_ event: @escaping (ResumableListener) -> Void) {
        guard let l = listener else { return }
        opts.callbackQueue.async { event(l) }
    }

    private func closeTask(_ task: URLSessionWebSocketTask, code: Int, reason: String?) {
        let c = URLSessionWebSocketTask.CloseCode(rawValue: code) ?? .normalClosure
        task.cancel(with: c, reason: reason?.data(using: .utf8))
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
        grace = (response?.value(forHTTPHeaderField: Self.graceHeader).flatMap { Double($0) } ?? 0) / 1000
        open = true
        attempt = 0
        lostAt = nil
        sentSinceOpen = 0
        cancelAbandonedLocked()
        post { l in l.onOpen(self, resumed: resumed) }
        // The lock keeps new sends out until the resend is queued.
        for m in outbox { sendOn(webSocketTask, m) }
        if closing { closeTask(webSocketTask, code: closeCode, reason: closeReason) }
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
            case .failure(let error): self.failed(task, error: error, response: nil)
            }
        }
    }

    /// A message on the current connection: count it, hand it over.
    private func deliver(_ task: URLSessionWebSocketTask, _ m: Message) {
        lock.lock(); defer { lock.unlock() }
        guard task === current, !finished else { return }
        received += 1
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
        guard webSocketTask === current else {
            webSocketTask.cancel()
            return
        }
        let code = closeCode.rawValue
        let why = reason.flatMap { String(data: $0, encoding: .utf8) } ?? ""
        // Answer the close frame, as OkHttp must be told to.
        webSocketTask.cancel(with: .normalClosure, reason: nil)
        current = nil
        open = false
        stopPingsLocked()
        if finished { return }
        if closing {
            finishLocked { l in l.onClosed(self, code: code, reason: why) }
            return
        }
        switch Policy.afterClose(code: code, reason: why) {
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
        let wasOpen = open
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
        if wasOpen { lostAt = Date() }
        retryLocked(error, atLeast: 0)
    }
}
