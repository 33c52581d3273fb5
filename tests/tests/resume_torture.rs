//! The resume torture test: many clients exchange numbered messages with an
//! echo backend while their connections are cut at random moments,
//! including in the middle of a frame they are sending and while the
//! gateway is writing to them. At the end every message has arrived exactly
//! once and in order, in both directions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use gateway_tests::raw::{Frame, Raw};
use gateway_tests::secs;
use gateway_tests::{Event, Gateway, GatewayOpts, TestBackend};
use protocol::Framing;

const CLIENTS: usize = 40;
const MESSAGES: u64 = 200;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One client: returns (cuts, resumes).
async fn client(i: usize, addr: std::net::SocketAddr, seed: u64) -> (u32, u32) {
    let mut rng = Rng(seed | 1);
    let mut token: Option<String> = None;
    let (mut got, mut cuts, mut resumes) = (0u64, 0u32, 0u32);
    loop {
        let headers = match &token {
            None => vec![("X-Wsgw-Resume", "new".to_owned())],
            Some(t) => vec![
                ("X-Wsgw-Resume", t.clone()),
                ("X-Wsgw-Received", got.to_string()),
            ],
        };
        let mut raw = match Raw::connect(addr, &headers).await {
            Ok(r) => r,
            Err(status) => {
                panic!("client {i}: resume refused with HTTP {status} after {cuts} cuts")
            }
        };
        if token.is_some() {
            resumes += 1;
        }
        token = Some(raw.header("x-wsgw-resume").unwrap().to_owned());
        // The gateway says which of our messages it has: resend the rest.
        let mut next: u64 = raw.header("x-wsgw-received").unwrap().parse().unwrap();
        let steps = 1 + rng.below(30);
        let mut cut = false;
        for step in 0..steps {
            if next < MESSAGES {
                let frame = Raw::encode(format!("{i}:{next}").as_bytes());
                if step + 1 == steps && rng.below(2) == 0 {
                    // Cut in the middle of a frame we are sending.
                    let part = 1 + rng.below(frame.len() as u64 - 1) as usize;
                    let _ = raw.write(&frame[..part]).await;
                    cut = true;
                    break;
                }
                if raw.write(&frame).await.is_err() {
                    cut = true;
                    break;
                }
                next += 1;
            }
            let wait = if next < MESSAGES { rng.below(3) } else { 50 };
            loop {
                match raw.next(Duration::from_millis(wait)).await {
                    Ok(Some(Frame::Data(p))) => {
                        let text = String::from_utf8(p).unwrap();
                        let (who, seq) = text.split_once(':').unwrap();
                        assert_eq!(
                            who.parse::<usize>().unwrap(),
                            i,
                            "client {i} got another client's message"
                        );
                        let seq: u64 = seq.parse().unwrap();
                        assert_eq!(seq, got, "client {i}: expected echo {got}, got {seq} (lost, duplicated or reordered)");
                        got += 1;
                    }
                    Ok(Some(Frame::Close(code))) => panic!("client {i}: closed with {code}"),
                    Ok(None) => break,
                    Err(_) => {
                        cut = true;
                        break;
                    }
                }
            }
            if cut || got == MESSAGES {
                break;
            }
        }
        if got == MESSAGES {
            return (cuts, resumes);
        }
        // Vanish without a close, possibly while echoes are being written.
        drop(raw);
        cuts += 1;
        let _ = cut;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn random_cuts_lose_nothing_and_duplicate_nothing_in_either_direction() {
    let mut backend = TestBackend::start(Framing::Varint, true).await;
    let gw = Gateway::start(
        GatewayOpts::new(backend.addr)
            .config(|c| c.resume.grace = secs(30))
            .config(|c| c.resume.buffer_bytes = gateway_tests::mib(1)),
    );
    gw.wait_ready(Duration::from_secs(10)).await;
    let addr = gw.ws.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        tasks.spawn(client(i, addr, 0x9e37_79b9_7f4a_7c15 ^ (i as u64 * 7919)));
    }
    let (mut cuts, mut resumes) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (c, r) = r.unwrap();
        cuts += c;
        resumes += r;
    }
    assert!(
        cuts >= CLIENTS as u32 * 3,
        "the test must actually cut connections ({cuts})"
    );
    assert_eq!(
        resumes, cuts,
        "every cut was followed by a successful resume"
    );

    // The backend side: each session received 0..MESSAGES exactly once, in
    // order, although clients resent after cuts.
    let mut per_session: HashMap<u64, Vec<String>> = HashMap::new();
    while let Ok(Some(e)) =
        tokio::time::timeout(Duration::from_millis(200), backend.events.recv()).await
    {
        if let Event::Data {
            session, payload, ..
        } = e
        {
            per_session
                .entry(session)
                .or_default()
                .push(String::from_utf8(payload.to_vec()).unwrap());
        }
    }
    assert_eq!(
        per_session.len(),
        CLIENTS,
        "one backend session per client, across all its connections"
    );
    for msgs in per_session.values() {
        let who = msgs[0].split_once(':').unwrap().0.to_owned();
        let expected: Vec<String> = (0..MESSAGES).map(|k| format!("{who}:{k}")).collect();
        assert_eq!(
            msgs, &expected,
            "client {who}: the backend saw a gap, a duplicate or a reordering"
        );
    }
    println!("{cuts} cuts, {resumes} resumes");
}
