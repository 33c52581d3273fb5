//! What instances of a fleet say to each other, through Redis pub/sub: a
//! request for a session, and the answer carrying the session's state.
//!
//! Protobuf (prost), like the link protocol: every field is a count from
//! the session's start or a message that must survive the move unchanged.

use protocol::pb;

/// One message on an instance's channel (`<prefix>:i:<instance_id>`).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Envelope {
    #[prost(oneof = "Kind", tags = "1, 2")]
    pub(crate) kind: Option<Kind>,
}

// One per handover, never stored: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum Kind {
    #[prost(message, tag = "1")]
    Request(Request),
    #[prost(message, tag = "2")]
    Reply(Reply),
}

/// "Hand me the session holding `token`": from the instance a client's
/// resume reached to the instance that owns the session.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Request {
    /// Matches the reply to the waiting resume.
    #[prost(uint64, tag = "1")]
    pub(crate) request_id: u64,
    /// The instance asking (its channel gets the reply).
    #[prost(string, tag = "2")]
    pub(crate) from_instance: String,
    /// The credential the client presented.
    #[prost(string, tag = "3")]
    pub(crate) token: String,
    /// Backend messages the client says it has received.
    #[prost(uint64, tag = "4")]
    pub(crate) position: u64,
    /// How long the asker still waits for the answer, in milliseconds: the
    /// holder does not hand over what would arrive too late.
    #[prost(uint64, tag = "5")]
    pub(crate) wait_ms: u64,
    /// Sent to every instance (the directory had no entry): only the
    /// instance holding the session answers.
    #[prost(bool, tag = "6")]
    pub(crate) broadcast: bool,
}

/// The answer: the session's state, or why not.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Reply {
    #[prost(uint64, tag = "1")]
    pub(crate) request_id: u64,
    #[prost(message, optional, tag = "2")]
    pub(crate) state: Option<State>,
    /// Without `state`: the refusal's label (see `ResumeRefusal::label`).
    #[prost(string, tag = "3")]
    pub(crate) refused: String,
    /// The credential the request presented (an answer that arrives after
    /// the asker gave up is still taken in, under it).
    #[prost(string, tag = "4")]
    pub(crate) token: String,
}

/// A message with its type.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Msg {
    #[prost(bytes = "bytes", tag = "1")]
    pub(crate) payload: bytes::Bytes,
    #[prost(bool, tag = "2")]
    pub(crate) text: bool,
}

/// Everything a resumable session on a version 3 link with "move" keeps,
/// as the instance handing it over leaves it. Counts are from the
/// session's start, across links and instances.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct State {
    #[prost(uint64, tag = "1")]
    pub(crate) session_id: u64,
    /// The `Hello.instance_id` the session was opened under: the backend's
    /// key for it, wherever it goes.
    #[prost(string, tag = "2")]
    pub(crate) origin_instance_id: String,
    /// The session's original `open`.
    #[prost(message, optional, tag = "3")]
    pub(crate) open: Option<pb::SessionOpen>,
    /// Client messages accepted.
    #[prost(uint64, tag = "4")]
    pub(crate) client_received: u64,
    /// Backend messages received (all of them are in `ring` or were
    /// delivered before its oldest).
    #[prost(uint64, tag = "5")]
    pub(crate) delivered: u64,
    /// The replay ring, oldest first: messages `delivered - len ..
    /// delivered`.
    #[prost(message, repeated, tag = "6")]
    pub(crate) ring: Vec<Msg>,
    /// Backend to client: cost received, the limit granted, cost consumed.
    #[prost(uint64, tag = "7")]
    pub(crate) received_cost: u64,
    #[prost(uint64, tag = "8")]
    pub(crate) granted: u64,
    #[prost(uint64, tag = "9")]
    pub(crate) consumed: u64,
    /// Client to backend: the backend's limit, data frames it acknowledged
    /// and their cost, the cost sent.
    #[prost(uint64, tag = "10")]
    pub(crate) backend_limit: u64,
    #[prost(uint64, tag = "11")]
    pub(crate) acked: u64,
    #[prost(uint64, tag = "12")]
    pub(crate) acked_cost: u64,
    #[prost(uint64, tag = "13")]
    pub(crate) sent_cost: u64,
    /// Client messages sent and not acknowledged, oldest first, then the
    /// one accepted and not yet sent (if any).
    #[prost(message, repeated, tag = "14")]
    pub(crate) unacked: Vec<Msg>,
    #[prost(message, optional, tag = "15")]
    pub(crate) pending: Option<Msg>,
}
