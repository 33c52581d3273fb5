//! The handshake against an in-memory backend, under paused time: what the
//! backend reads, and what an operator is told when the backend does not
//! answer as the contract says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use tokio::io::DuplexStream;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(5);

fn hello() -> pb::Hello {
    pb::Hello {
        min_version: 1,
        max_version: 3,
        gateway_id: "gw".into(),
        link_index: 3,
        instance_id: "0f".repeat(16),
        heartbeat_interval_ms: 5000,
        heartbeat_timeout_ms: 15_000,
        max_frame_size: 64 * 1024,
        max_message_size: 60 * 1024,
        client_queue_bytes: 1 << 20,
        capabilities: vec!["flow".into(), "move".into()],
        session_window: 1 << 20,
        move_timeout_ms: 10_000,
    }
}

/// The backend's side: reads the gateway's hello (in `framing`), then
/// writes `answer` as raw bytes and, if `close`, closes the connection.
async fn backend(
    mut s: DuplexStream,
    framing: Framing,
    answer: Vec<u8>,
    close: bool,
) -> (pb::Hello, Option<DuplexStream>) {
    let codec = FrameCodec::new(framing, 64 * 1024);
    let mut buf = BytesMut::new();
    let frame = loop {
        if let Some(f) = codec.decode(&mut buf).unwrap() {
            break f;
        }
        assert!(s.read_buf(&mut buf).await.unwrap() > 0);
    };
    let Some(Body::Hello(h)) = frame.body else {
        panic!("first frame {frame:?}")
    };
    assert_eq!(frame.session_id, 0);
    s.write_all(&answer).await.unwrap();
    (*h, (!close).then_some(s))
}

fn wire(framing: Framing, frames: &[Frame]) -> Vec<u8> {
    let codec = FrameCodec::new(framing, 64 * 1024);
    let mut out = BytesMut::new();
    for f in frames {
        codec.encode(f, &mut out).unwrap();
    }
    out.to_vec()
}

fn ack(version: u32, error: &str) -> Frame {
    let mut f = Frame::hello_ack(version, "be-1");
    if let Some(Body::HelloAck(a)) = f.body.as_mut() {
        a.error = error.into();
    }
    f
}

/// Runs a handshake with the gateway on `gateway` framing against a
/// backend answering `answer` (encoded in `backend` framing).
async fn run(
    gateway: Framing,
    backend_framing: Framing,
    answer: Vec<u8>,
    close: bool,
) -> (Result<Handshaken, LinkError>, pb::Hello) {
    let (mut gw, be) = tokio::io::duplex(64 * 1024);
    let codec = FrameCodec::new(gateway, 64 * 1024);
    // The backend reads the hello in its own framing only when the two
    // agree; otherwise it just answers.
    let be_side = async move {
        if gateway == backend_framing {
            let (h, s) = backend(be, backend_framing, answer, close).await;
            (Some(h), s)
        } else {
            let mut be = be;
            be.write_all(&answer).await.unwrap();
            (None, (!close).then_some(be))
        }
    };
    let sent = hello();
    let (r, (h, _keep)) = tokio::join!(handshake(&mut gw, &codec, &sent, TIMEOUT), be_side);
    (r, h.unwrap_or_default())
}

fn failure(r: Result<Handshaken, LinkError>) -> HandshakeError {
    match r {
        Err(LinkError::Handshake(h)) => h,
        Err(e) => panic!("not a handshake error: {e}"),
        Ok(_) => panic!("the handshake succeeded"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_backend_reads_every_hello_field_and_a_good_ack_completes() {
    let mut answer = wire(Framing::Varint, &[ack(2, "")]);
    // A frame right behind the ack belongs to the link's reader.
    answer.extend(wire(
        Framing::Varint,
        &[Frame::data(9, Bytes::from_static(b"x"), false)],
    ));
    let (r, seen) = run(Framing::Varint, Framing::Varint, answer, false).await;
    assert_eq!(seen, hello());
    let hs = r.unwrap();
    assert_eq!((hs.version, hs.backend_id.as_str()), (2, "be-1"));
    assert!(!hs.leftover.is_empty());
}

#[tokio::test(start_paused = true)]
async fn each_failure_says_what_was_wrong_and_what_to_check() {
    let v = Framing::Varint;
    let cases: Vec<(HandshakeError, &str, &[&str])> = vec![
        (
            failure(run(v, v, wire(v, &[ack(0, "only v7")]), true).await.0),
            "refused",
            &[
                "refused every protocol version",
                "1..=3",
                "only v7",
                "upgrade",
            ],
        ),
        (
            failure(run(v, v, wire(v, &[ack(7, "")]), false).await.0),
            "bad_version",
            &["chose protocol version 7", "1..=3", "fix the backend"],
        ),
        (
            failure(
                run(v, v, wire(v, &[Frame::heartbeat(1, false)]), false)
                    .await
                    .0,
            ),
            "not_hello_ack",
            &["heartbeat frame", "hello_ack first", "fix the backend"],
        ),
        (
            failure(run(v, v, Vec::new(), true).await.0),
            "closed",
            &["closed the connection", "varint framing", "backend.framing"],
        ),
        (
            failure(run(v, v, Vec::new(), false).await.0),
            "timeout",
            &[
                "no hello_ack within 5s",
                "backend.handshake_timeout",
                "varint",
            ],
        ),
        // A backend on the other framing: each way round, the gateway
        // cannot read its answer, and says to check the framing.
        (
            failure(
                run(
                    v,
                    Framing::U32Be,
                    wire(Framing::U32Be, &[ack(2, "")]),
                    false,
                )
                .await
                .0,
            ),
            "undecodable",
            &["not a varint-framed", "backend.framing"],
        ),
        (
            failure(
                run(Framing::U32Be, v, wire(v, &[ack(2, "")]), false)
                    .await
                    .0,
            ),
            "undecodable",
            &["not a u32be-framed", "backend.framing"],
        ),
    ];
    for (e, label, words) in cases {
        assert_eq!(e.label(), label, "{e}");
        let text = e.to_string();
        for w in words {
            assert!(text.contains(w), "{label}: {w:?} not in {text:?}");
        }
    }
}

/// A version 3 answer adopting `caps` with `window`.
fn ack3(caps: &[&str], window: u64) -> Frame {
    let mut f = Frame::hello_ack(3, "be-1");
    if let Some(Body::HelloAck(a)) = f.body.as_mut() {
        a.capabilities = caps.iter().map(|c| (*c).to_owned()).collect();
        a.session_window = window;
    }
    f
}

#[tokio::test(start_paused = true)]
async fn version_3_capabilities_are_adopted_one_at_a_time() {
    let v = Framing::Varint;
    let caps = |answer: Frame| async move { run(v, v, wire(v, &[answer]), false).await.0 };
    let hs = caps(ack3(&["flow", "move"], 2 << 20)).await.unwrap();
    assert_eq!(
        hs.caps,
        Caps {
            flow: true,
            moves: true,
            fleet: false,
            backend_window: 2 << 20
        }
    );
    // Flow alone; a window of 0 is the gateway's own.
    let hs = caps(ack3(&["flow"], 0)).await.unwrap();
    assert_eq!(
        (hs.caps.flow, hs.caps.moves, hs.caps.backend_window),
        (true, false, 1 << 20)
    );
    // Version 3 without capabilities behaves as version 2.
    let hs = caps(ack3(&[], 0)).await.unwrap();
    assert_eq!(hs.caps, Caps::default());
    // A version 2 answer cannot adopt any.
    let mut two = ack3(&["flow"], 0);
    if let Some(Body::HelloAck(a)) = two.body.as_mut() {
        a.version = 2;
    }
    assert_eq!(caps(two).await.unwrap().caps, Caps::default());
}

#[tokio::test(start_paused = true)]
async fn unusable_capabilities_fail_the_handshake_loudly() {
    let v = Framing::Varint;
    let cases: Vec<(Frame, &[&str])> = vec![
        (ack3(&["move"], 0), &["\"move\" without \"flow\""]),
        (
            ack3(&["flow", "teleport"], 0),
            &["\"teleport\"", "not offered"],
        ),
        (
            ack3(&["flow"], 1000),
            &["session_window 1000", "max_message_size 61440 + 64"],
        ),
    ];
    for (answer, words) in cases {
        let e = failure(run(v, v, wire(v, &[answer]), false).await.0);
        assert_eq!(e.label(), "bad_capabilities", "{e}");
        let text = e.to_string();
        for w in words {
            assert!(text.contains(w), "{w:?} not in {text:?}");
        }
    }
}
