//! Every way a session ends, and the one table that maps it to a WebSocket
//! close code for the client, a `SessionClose` for the backend, a metric
//! label and a log level. `protocol/README.md` documents the same table.

use std::borrow::Cow;

/// Close codes used by the gateway itself (RFC 6455 section 7.4.1).
pub(crate) mod code {
    /// Going away: the gateway is shutting down; reconnect at once.
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol.
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    /// Never on the wire: the peer closed without a code.
    pub(crate) const NO_STATUS: u16 = 1005;
    /// Never on the wire: the connection was lost without a close frame.
    pub(crate) const ABNORMAL: u16 = 1006;
    /// Invalid UTF-8 in a text message.
    pub(crate) const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation; the gateway uses it for slow consumers.
    pub(crate) const POLICY: u16 = 1008;
    /// Message larger than `session.max_message_size`.
    pub(crate) const TOO_BIG: u16 = 1009;
    /// Internal error: the backend sent something invalid for the session.
    pub(crate) const INTERNAL: u16 = 1011;
    /// Service restart: the backend link was lost; reconnect with backoff.
    pub(crate) const RECONNECT: u16 = 1012;
    /// Reserved by the gateway (a backend may not send it): the instance is
    /// going away but keeps the session for another instance to take over;
    /// resume at once. Private-use range (RFC 6455 7.4.2), so that every
    /// client library accepts it.
    pub(crate) const RESUME_NOW: u16 = 4000;
}

/// Why a session ended. Exhaustive: every path that ends a session picks one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client sent a close frame (`code` is 1005 if it gave none).
    ClientClosed {
        /// The client's code.
        code: u16,
        /// The client's reason.
        reason: String,
    },
    /// The client's connection ended without a close frame (EOF, reset).
    ClientLost,
    /// The client did not answer pings in time.
    ClientTimeout,
    /// The client broke the WebSocket protocol.
    ClientProtocolError(Cow<'static, str>),
    /// A text message from the client was not valid UTF-8.
    ClientInvalidUtf8,
    /// A client message exceeded `session.max_message_size`.
    ClientMessageTooBig,
    /// The client did not read fast enough; its queue overflowed.
    SlowConsumer,
    /// The backend closed the session.
    BackendClosed {
        /// The backend's code, as sent.
        code: u32,
        /// The backend's reason.
        reason: String,
    },
    /// The backend sent data that cannot be delivered (invalid UTF-8 in
    /// text, payload over the size limit).
    BackendInvalid(Cow<'static, str>),
    /// The session's link to the backend was lost.
    LinkLost,
    /// The gateway is shutting down.
    Shutdown,
    /// A resume on another connection took the session over (this
    /// connection ends; the session goes on).
    TakenOver,
    /// A detached session ended: its client did not come back in time, its
    /// replay buffer overflowed, the gateway-wide cap on detached sessions
    /// was reached, or the client resumed from a position no longer held.
    ResumeLost(&'static str),
    /// The gateway is draining and keeps the session for another instance
    /// of its fleet: the client is told to resume at once (the session
    /// detaches).
    HandOff,
    /// Another instance of the fleet took the session over (its state went
    /// there; the backend sees the session move).
    HandedOver,
}

/// What the client is sent, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientClose {
    /// WebSocket close code.
    pub(crate) code: u16,
    /// Reason, at most 123 bytes.
    pub(crate) reason: String,
}

/// Who ended the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The client (or its network).
    Client,
    /// The backend.
    Backend,
    /// The gateway itself (shutdown, limits, a lost link).
    Gateway,
}

/// One row of the close table.
struct Row<'a> {
    side: Side,
    /// The client's close frame; `None` when the client is gone or closed
    /// first (its close is echoed by the session, not decided here).
    client: Option<(u16, Cow<'a, str>)>,
    /// The backend's `SessionClose`: `None` when the backend closed first or
    /// the link is gone; `Same` when it is what the client gets.
    backend: Backend<'a>,
    label: &'static str,
    /// Worth operator attention (warn) rather than ordinary churn (debug).
    notable: bool,
}

enum Backend<'a> {
    None,
    Same,
    Is(u16, Cow<'a, str>),
}

impl CloseReason {
    /// The close table: every way a session ends, in one exhaustive match.
    /// `protocol/README.md` and the README document the same table.
    fn row(&self) -> Row<'_> {
        use Side::{Backend as B, Client as C, Gateway as G};
        let row = |side, client, backend, label, notable| Row {
            side,
            client,
            backend,
            label,
            notable,
        };
        let lost = |why: &'static str| Backend::Is(code::ABNORMAL, why.into());
        match self {
            Self::ClientClosed { code, reason } => row(
                C,
                None,
                Backend::Is(*code, reason.as_str().into()),
                "client_closed",
                false,
            ),
            Self::ClientLost => row(
                C,
                None,
                lost("client connection lost"),
                "client_lost",
                false,
            ),
            Self::ClientTimeout => row(
                C,
                None,
                lost("client ping timeout"),
                "client_timeout",
                false,
            ),
            Self::ClientProtocolError(why) => row(
                C,
                Some((code::PROTOCOL_ERROR, Cow::Borrowed(why.as_ref()))),
                Backend::Same,
                "client_protocol_error",
                false,
            ),
            Self::ClientInvalidUtf8 => row(
                C,
                Some((
                    code::INVALID_PAYLOAD,
                    "invalid UTF-8 in text message".into(),
                )),
                Backend::Same,
                "client_invalid_utf8",
                false,
            ),
            Self::ClientMessageTooBig => row(
                C,
                Some((code::TOO_BIG, "message too big".into())),
                Backend::Same,
                "client_message_too_big",
                false,
            ),
            Self::SlowConsumer => row(
                C,
                Some((code::POLICY, "slow consumer".into())),
                Backend::Same,
                "slow_consumer",
                true,
            ),
            Self::TakenOver => row(
                C,
                Some((code::POLICY, "session resumed on another connection".into())),
                Backend::None,
                "taken_over",
                false,
            ),
            Self::BackendClosed { code, reason } => {
                let client = match u16::try_from(*code) {
                    Ok(c) if backend_code_allowed(c) => (c, Cow::Borrowed(reason.as_str())),
                    _ => (
                        code::INTERNAL,
                        format!("backend sent invalid close code {code}").into(),
                    ),
                };
                row(B, Some(client), Backend::None, "backend_closed", false)
            }
            Self::BackendInvalid(why) => row(
                B,
                Some((code::INTERNAL, Cow::Borrowed(why.as_ref()))),
                Backend::Same,
                "backend_invalid",
                true,
            ),
            Self::LinkLost => row(
                G,
                Some((code::RECONNECT, "backend link lost, reconnect".into())),
                Backend::None,
                "link_lost",
                true,
            ),
            Self::Shutdown => row(
                G,
                Some((code::GOING_AWAY, "gateway shutting down".into())),
                Backend::Same,
                "shutdown",
                false,
            ),
            Self::HandOff => row(
                G,
                Some((
                    code::RESUME_NOW,
                    "resume: this gateway is restarting".into(),
                )),
                Backend::None,
                "handed_off",
                false,
            ),
            Self::HandedOver => row(G, None, Backend::None, "handed_over", false),
            Self::ResumeLost(why) => row(
                G,
                None,
                Backend::Is(code::ABNORMAL, format!("session expired: {why}").into()),
                "resume_lost",
                true,
            ),
        }
    }

    /// Who ended the session.
    pub(crate) fn side(&self) -> Side {
        self.row().side
    }

    /// The close frame for the client; `None` when the client is gone or
    /// closed first (its close is echoed by the session, not decided here).
    pub(crate) fn to_client(&self) -> Option<ClientClose> {
        self.row().client.map(|(code, reason)| ClientClose {
            code,
            reason: truncate_reason(&reason).to_owned(),
        })
    }

    /// The `SessionClose` for the backend; `None` when the backend closed
    /// first or the link is gone.
    pub(crate) fn to_backend(&self) -> Option<(u16, String)> {
        let row = self.row();
        match row.backend {
            Backend::None => None,
            Backend::Is(code, reason) => Some((code, reason.into_owned())),
            Backend::Same => row
                .client
                .map(|(code, reason)| (code, truncate_reason(&reason).to_owned())),
        }
    }

    /// Label for the `sessions_closed` metric.
    pub(crate) fn label(&self) -> &'static str {
        self.row().label
    }

    /// The client's connection was lost without a close: a resumable
    /// session detaches instead of ending.
    pub(crate) fn is_connection_loss(&self) -> bool {
        matches!(self, Self::ClientLost | Self::ClientTimeout | Self::HandOff)
    }

    /// Whether this end deserves operator attention (logged at warn) or is
    /// ordinary client churn (logged at debug).
    pub(crate) fn is_notable(&self) -> bool {
        self.row().notable
    }
}

/// Codes a backend may send that are valid on the WebSocket wire.
/// (4000 is the gateway's own, [`code::RESUME_NOW`].)
fn backend_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1009 | 1011..=1014 | 3000..=3999 | 4001..=4999)
}

/// Codes a client may send (RFC 6455 7.4.1 and the IANA registry).
pub(crate) fn client_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Cuts a close reason to the 123 bytes a control frame allows, at a
/// character boundary.
pub(crate) fn truncate_reason(reason: &str) -> &str {
    const MAX: usize = 123;
    if reason.len() <= MAX {
        return reason;
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backend_codes_map_through_one_table() {
        for (sent, expected) in [
            (1000, 1000),
            (1001, 1001),
            (1008, 1008),
            (1011, 1011),
            (1012, 1012),
            (1013, 1013),
            (3000, 3000),
            (4321, 4321),
            (4999, 4999),
            (1005, 1011),
            (1006, 1011),
            (1015, 1011),
            (1010, 1011),
            (0, 1011),
            (2500, 1011),
            (5000, 1011),
            (70_000, 1011),
        ] {
            let r = CloseReason::BackendClosed {
                code: sent,
                reason: "x".into(),
            };
            assert_eq!(r.to_client().unwrap().code, expected, "backend code {sent}");
            assert_eq!(r.to_backend(), None);
        }
    }

    #[test]
    fn gateway_decisions_have_codes() {
        assert_eq!(
            CloseReason::ClientMessageTooBig.to_client().unwrap().code,
            1009
        );
        assert_eq!(
            CloseReason::ClientInvalidUtf8.to_client().unwrap().code,
            1007
        );
        assert_eq!(
            CloseReason::ClientProtocolError("x".into())
                .to_client()
                .unwrap()
                .code,
            1002
        );
        assert_eq!(CloseReason::SlowConsumer.to_client().unwrap().code, 1008);
        assert_eq!(CloseReason::LinkLost.to_client().unwrap().code, 1012);
        assert_eq!(CloseReason::Shutdown.to_client().unwrap().code, 1001);
        assert_eq!(CloseReason::SlowConsumer.to_backend().unwrap().0, 1008);
        assert_eq!(CloseReason::ClientLost.to_backend().unwrap().0, 1006);
        assert_eq!(CloseReason::ClientTimeout.to_backend().unwrap().0, 1006);
        assert_eq!(CloseReason::LinkLost.to_backend(), None);
        assert_eq!(CloseReason::ClientLost.to_client(), None);
        assert_eq!(
            CloseReason::Shutdown.to_backend(),
            Some((1001, "gateway shutting down".to_owned()))
        );
        assert_eq!(
            CloseReason::ResumeLost("x").to_backend(),
            Some((1006, "session expired: x".to_owned()))
        );
        assert_eq!(CloseReason::TakenOver.to_backend(), None);
        assert_eq!(CloseReason::SlowConsumer.side(), Side::Client);
        assert_eq!(CloseReason::LinkLost.side(), Side::Gateway);
        assert!(CloseReason::LinkLost.is_notable());
        assert!(!CloseReason::ClientLost.is_notable());
    }

    #[test]
    fn reasons_are_cut_at_char_boundary() {
        let long = "é".repeat(100);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= 123);
        assert_eq!(cut.len(), 122);
        let r = CloseReason::BackendClosed {
            code: 4000,
            reason: long,
        };
        assert!(r.to_client().unwrap().reason.len() <= 123);
    }
}
