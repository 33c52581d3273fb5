//! A link's reader: the backend's bytes decoded, validated and dispatched
//! by a real link driver (over an in-memory stream), against a model of
//! the contract's table "Everything the gateway does with what it reads
//! from a link" (protocol/README.md).
//!
//! The model splits the stream with the codec (fuzzed on its own in
//! `codec`) and decides per frame: heartbeats answered, data and close
//! delivered in order to open sessions only, nothing after a session's
//! end, an undecodable frame ends only its session, data past a flow
//! window ends its session, and a frame the backend must not send (or
//! undecodable bytes) ends the link. The driver must agree exactly on
//! what each session received, why it went, and how the link ended; the
//! heartbeat answers must be the requests' nonces in order (some may be
//! dropped when many arrive at once).
#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use gateway::fuzzing::{run_link, Delivered, LinkEnd};
use libfuzzer_sys::fuzz_target;
use protocol::{Body, FrameCodec};
use wsgw_fuzz::Input;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

struct ModelSession {
    id: u64,
    delivered: Vec<Delivered>,
    open: bool,
    used: u64,
}

struct Model {
    end: LinkEnd,
    sessions: Vec<ModelSession>,
    requests: Vec<u64>,
}

fn model(codec: &FrameCodec, flow: bool, window: u64, ids: &[u64], wire: &[u8]) -> Model {
    let mut sessions: Vec<ModelSession> = ids
        .iter()
        .map(|&id| ModelSession {
            id,
            delivered: Vec::new(),
            open: true,
            used: 0,
        })
        .collect();
    let mut requests = Vec::new();
    let mut buf = BytesMut::from(wire);
    let end = loop {
        let frame = match codec.decode(&mut buf) {
            Ok(Some(f)) => f,
            Ok(None) => break LinkEnd::Eof,
            Err(e) => match e.session() {
                Some(id) => {
                    if let Some(s) = sessions.iter_mut().find(|s| s.id == id && s.open) {
                        s.delivered.push(Delivered::Invalid);
                        s.open = false;
                    }
                    continue;
                }
                None => break LinkEnd::Decode,
            },
        };
        let id = frame.session_id;
        let Some(body) = frame.body else {
            break LinkEnd::Decode;
        };
        if id == 0 {
            match body {
                Body::Heartbeat(hb) => {
                    if !hb.ack {
                        requests.push(hb.nonce);
                    }
                    continue;
                }
                _ => break LinkEnd::Protocol,
            }
        }
        let session = sessions.iter_mut().find(|s| s.id == id && s.open);
        match body {
            Body::Window(_) if flow => {}
            Body::Data(d) => {
                if let Some(s) = session {
                    s.used += d.payload.len() as u64 + 64;
                    if flow && s.used > window {
                        s.delivered.push(Delivered::Invalid);
                        s.open = false;
                    } else {
                        s.delivered
                            .push(Delivered::Data(d.payload.to_vec(), d.text));
                    }
                }
            }
            Body::Close(c) => {
                if let Some(s) = session {
                    s.delivered.push(Delivered::Close(c.code, c.reason));
                    s.open = false;
                }
            }
            _ => break LinkEnd::Protocol,
        }
    };
    Model {
        end,
        sessions,
        requests,
    }
}

/// Whether `sub` is `full` with some entries left out, in order.
fn is_subsequence(sub: &[u64], full: &[u64]) -> bool {
    let mut it = full.iter();
    sub.iter().all(|x| it.any(|y| y == x))
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let framing = input.framing();
    let codec = FrameCodec::new(framing, 256 + usize::from(input.u16()));
    let flow = input.bool();
    let window = u64::from(input.u16());
    // Sessions 1 to 3 are open on the link; others are not.
    let ids = [1, 2, 3];
    let wire = input.short().to_vec();
    let mut wire = wire;
    wire.extend_from_slice(input.rest());
    let chunks = Input(data).chunks(&wire);
    let run = runtime().block_on(run_link(codec, flow, window, &ids, &chunks));
    let expected = model(&codec, flow, window, &ids, &wire);
    assert_eq!(run.end, expected.end, "how the link ended");
    for (got, want) in run.sessions.iter().zip(&expected.sessions) {
        assert_eq!(got.id, want.id);
        assert_eq!(got.delivered, want.delivered, "session {}", want.id);
        let gone = if !want.open {
            "backend_closed"
        } else {
            "link_lost"
        };
        assert_eq!(got.gone, gone, "session {}", want.id);
    }
    assert_eq!(run.sessions.len(), ids.len());
    assert!(
        is_subsequence(&run.answered, &expected.requests),
        "answers {:?} to requests {:?}",
        run.answered,
        expected.requests
    );
});
