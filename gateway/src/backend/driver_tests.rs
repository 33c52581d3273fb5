//! The link driver against an in-memory backend, under paused time.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use bytes::Bytes;
use protocol::Framing;
use tokio::io::DuplexStream;

use super::*;
use crate::backend::flow::Caps;
use crate::backend::{Gone, Mailbox, MailboxLimits, TrySend, QUEUED_OVERHEAD};

fn settings() -> LinkSettings {
    LinkSettings {
        codec: FrameCodec::new(Framing::Varint, 64 * 1024),
        heartbeat_interval: Duration::from_secs(5),
        heartbeat_timeout: Duration::from_secs(14),
        queue_frames: 16,
        queue_bytes: 1 << 20,
        mailbox: MailboxLimits {
            bytes: 4 * (QUEUED_OVERHEAD + 64),
            drain_within: Duration::from_secs(20),
        },
        session_window: 4 * (QUEUED_OVERHEAD as u64 + 64),
    }
}

/// A driver over an in-memory stream; the other end is the backend's.
fn driver() -> (LinkDriver<DuplexStream>, LinkHandle, DuplexStream) {
    let (gateway_end, backend_end) = tokio::io::duplex(256 * 1024);
    let s = settings();
    let (handle, queues) = LinkHandle::new(0, 2, Caps::default(), &s);
    let metrics = Arc::new(Metrics::standalone().unwrap());
    let d = LinkDriver {
        stream: gateway_end,
        leftover: BytesMut::new(),
        queues,
        settings: s,
        metrics,
        handle: handle.clone(),
        endpoint: "test".to_owned(),
    };
    (d, handle, backend_end)
}

/// The backend's side: reads frames until the gateway closes the link.
async fn read_all(mut end: impl AsyncRead + Unpin) -> Vec<(Duration, Frame)> {
    let codec = settings().codec;
    let start = Instant::now();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    loop {
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            frames.push((start.elapsed(), f));
        }
        if end.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return frames;
        }
    }
}

async fn write(end: &mut (impl AsyncWrite + Unpin), frame: Frame) {
    let mut out = BytesMut::new();
    settings().codec.encode(&frame, &mut out).unwrap();
    end.write_all(&out).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn heartbeats_go_out_every_interval_and_a_silent_backend_ends_the_link() {
    let (d, _handle, backend) = driver();
    let start = Instant::now();
    let (end, frames) = tokio::join!(d.run(CancellationToken::new()), read_all(backend));
    assert!(matches!(end, LinkError::HeartbeatTimeout(_)), "{end:?}");
    // Exactly when nothing arrived for heartbeat_timeout, not before.
    assert_eq!(start.elapsed(), Duration::from_secs(14));
    let beats: Vec<(Duration, u64)> = frames
        .into_iter()
        .map(|(at, f)| match f.body {
            Some(Body::Heartbeat(hb)) if !hb.ack && f.session_id == 0 => (at, hb.nonce),
            other => panic!("unexpected frame {other:?}"),
        })
        .collect();
    let secs: Vec<u64> = beats.iter().map(|(at, _)| at.as_secs()).collect();
    assert_eq!(secs, vec![0, 5, 10], "one heartbeat per interval");
    let nonces: Vec<u64> = beats.iter().map(|(_, n)| *n).collect();
    assert_eq!(nonces, vec![1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn backend_heartbeats_are_answered_and_keep_the_link_alive() {
    let (d, _handle, mut backend) = driver();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let backend_side = async move {
        // Twenty seconds of heartbeats every 4 s: longer than the
        // heartbeat timeout, so the link lives only because they count.
        for nonce in 100..105 {
            write(&mut backend, Frame::heartbeat(nonce, false)).await;
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        stop.cancel();
        read_all(backend).await
    };
    let (end, frames) = tokio::join!(d.run(shutdown), backend_side);
    assert!(matches!(end, LinkError::Shutdown), "{end:?}");
    // The last answer may still be in the stream when the backend
    // starts reading; every answer carries the backend's nonce.
    let acks: Vec<u64> = frames
        .iter()
        .filter_map(|(_, f)| match &f.body {
            Some(Body::Heartbeat(hb)) if hb.ack => Some(hb.nonce),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![100, 101, 102, 103, 104]);
}

#[tokio::test(start_paused = true)]
async fn frames_reach_their_session_and_a_backend_close_evicts_it_after_its_data() {
    let (d, handle, mut backend) = driver();
    let Mailbox {
        mut queue,
        mut eviction,
        ..
    } = handle.register(SessionId(7)).unwrap();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let backend_side = async move {
        write(
            &mut backend,
            Frame::data(7, Bytes::from_static(b"one"), true),
        )
        .await;
        // A frame for a session this link does not carry is dropped.
        write(&mut backend, Frame::data(8, Bytes::from_static(b"x"), true)).await;
        write(&mut backend, Frame::close(7, 4000, "done")).await;
        let gone = eviction.wait().await;
        stop.cancel();
        (gone, backend)
    };
    let (end, (gone, _backend)) = tokio::join!(d.run(shutdown), backend_side);
    assert!(matches!(end, LinkError::Shutdown));
    assert_eq!(gone, Gone::BackendClosed);
    assert!(matches!(
        queue.try_recv(),
        Some(ToClient::Data { text: true, .. })
    ));
    assert!(matches!(
        queue.try_recv(),
        Some(ToClient::Close { code: 4000, .. })
    ));
    assert!(queue.try_recv().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_protocol_violation_ends_the_link_and_its_sessions_learn_it_was_lost() {
    let (d, handle, mut backend) = driver();
    let mut mailbox = handle.register(SessionId(1)).unwrap();
    let backend_side = async move {
        // A backend must never send Hello.
        write(&mut backend, Frame::hello(protocol::pb::Hello::default())).await;
        backend
    };
    let (end, _backend) = tokio::join!(d.run(CancellationToken::new()), backend_side);
    assert!(matches!(end, LinkError::Protocol(_)), "{end:?}");
    assert_eq!(mailbox.eviction.wait().await, Gone::LinkLost);
    // Senders learn at once that the link is gone.
    assert!(matches!(
        handle.try_send(Frame::data(1, Bytes::new(), false), None),
        TrySend::Gone(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn shutdown_writes_what_is_queued_then_closes_the_link() {
    let (d, handle, backend) = driver();
    for i in 0..3u8 {
        let sent = handle.try_send(Frame::data(1, Bytes::from(vec![i]), false), None);
        assert!(matches!(sent, TrySend::Sent));
    }
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let (end, frames) = tokio::join!(d.run(shutdown), read_all(backend));
    assert!(matches!(end, LinkError::Shutdown));
    let data: Vec<u8> = frames
        .iter()
        .filter_map(|(_, f)| match &f.body {
            Some(Body::Data(d)) => Some(d.payload[0]),
            _ => None,
        })
        .collect();
    assert_eq!(data, vec![0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn an_undecodable_frame_ends_only_its_session_and_the_link_lives_on() {
    let (d, handle, mut backend) = driver();
    let Mailbox {
        queue: mut bad_queue,
        eviction: mut bad,
        ..
    } = handle.register(SessionId(7)).unwrap();
    let Mailbox {
        queue: mut good_queue,
        ..
    } = handle.register(SessionId(8)).unwrap();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let backend_side = async move {
        // Session 7's close with a reason that is not UTF-8 (0xff): framed
        // correctly, so the stream is still in sync after it.
        let raw = [
            0x0a, 0x08, 0x07, 0x32, 0x06, 0x08, 0xa0, 0x1f, 0x12, 0x01, 0xff,
        ];
        backend.write_all(&raw).await.unwrap();
        write(
            &mut backend,
            Frame::data(8, Bytes::from_static(b"after"), false),
        )
        .await;
        let gone = bad.wait().await;
        // Give the reader the frame behind it.
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop.cancel();
        (gone, backend)
    };
    let (end, (gone, _backend)) = tokio::join!(d.run(shutdown), backend_side);
    assert!(
        matches!(end, LinkError::Shutdown),
        "the link lived on: {end:?}"
    );
    assert_eq!(gone, Gone::BackendClosed);
    assert!(matches!(
        bad_queue.try_recv(),
        Some(ToClient::Invalid { .. })
    ));
    assert!(matches!(good_queue.try_recv(), Some(ToClient::Data { .. })));
}

/// "move": the backend's data in a session that then goes quiet is
/// acknowledged 200 to 300 ms after its last data frame, with the grant
/// unchanged (protocol/README.md, "Acknowledge a quiet session"); data
/// that keeps coming postpones it.
#[tokio::test(start_paused = true)]
async fn a_quiet_session_gets_its_acknowledgement_200_to_300_ms_after_its_last_data() {
    let (gateway_end, backend_end) = tokio::io::duplex(256 * 1024);
    let s = settings();
    let window = s.session_window;
    let caps = Caps {
        flow: true,
        moves: true,
        fleet: false,
        backend_window: window,
    };
    let (handle, queues) = LinkHandle::new(0, 2, caps, &s);
    let d = LinkDriver {
        stream: gateway_end,
        leftover: BytesMut::new(),
        queues,
        settings: s,
        metrics: Arc::new(Metrics::standalone().unwrap()),
        handle: handle.clone(),
        endpoint: "test".to_owned(),
    };
    let _mailbox = handle.register(SessionId(7)).unwrap();
    let (rd, mut wr) = tokio::io::split(backend_end);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let backend_side = async move {
        let start = Instant::now();
        write(&mut wr, Frame::data(7, Bytes::from_static(b"one"), false)).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        write(&mut wr, Frame::data(7, Bytes::from_static(b"two"), false)).await;
        let last = start.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        (last, wr)
    };
    let (end, frames, (last, _wr)) = tokio::join!(d.run(shutdown), read_all(rd), backend_side);
    assert!(matches!(end, LinkError::Shutdown));
    let windows: Vec<_> = frames
        .iter()
        .filter_map(|(at, f)| match &f.body {
            Some(Body::Window(w)) if f.session_id == 7 => Some((*at, w.limit, w.received)),
            _ => None,
        })
        .collect();
    assert_eq!(windows.len(), 1, "{windows:?}");
    let (at, limit, received) = windows[0];
    assert_eq!((limit, received), (window, 2));
    let after = at - last;
    assert!(
        after >= Duration::from_millis(200) && after <= Duration::from_millis(300),
        "acknowledged {after:?} after the last data frame"
    );
}
