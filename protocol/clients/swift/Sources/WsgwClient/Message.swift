import Foundation

/// One message of the session, with its WebSocket type: the outbox keeps
/// the type so that a text message is resent as text after a resume.
/// (Kotlin: `Message.kt`.)
public enum Message {
    /// A text message.
    case text(String)
    /// A binary message.
    case binary(Data)

    /// Payload bytes (UTF-8 for text): what the outbox bounds count.
    var size: Int {
        switch self {
        case .text(let s): return s.utf8.count
        case .binary(let d): return d.count
        }
    }

    var task: URLSessionWebSocketTask.Message {
        switch self {
        case .text(let s): return .string(s)
        case .binary(let d): return .data(d)
        }
    }
}
