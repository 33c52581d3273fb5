//! Session resume: the request headers (`X-Wsgw-Resume`,
//! `X-Wsgw-Received`) read as a model of the README's rules, and the
//! replay ring against a reference that keeps every message.
//!
//! Headers: no resume header is a plain session; `new` (any case, spaces
//! around) a new one; anything else a resume, whose credential counts only
//! as exactly 32 lowercase hex digits (otherwise it is treated as unknown:
//! 410, never an error that tells a prober more), and which needs a
//! received count that is a `u64`; a value that is not visible ASCII is
//! refused (400).
//!
//! Ring: the sequence numbers, what is held and its bytes follow the
//! eviction rule (oldest first, while over the bound, never the newest,
//! never from `keep_from` on); `since(p)` gives exactly messages p.. or
//! refuses with `bad_position` (p past the end) or `gap` (no longer held).
#![no_main]

use gateway::fuzzing::{resume_ask, ResumeAsk, Ring};
use libfuzzer_sys::fuzz_target;
use wsgw_fuzz::Input;

/// A header value as the fuzzer writes it, biased towards the forms that
/// matter.
fn value(input: &mut Input) -> Vec<u8> {
    match input.u8() % 6 {
        0 => b"new".to_vec(),
        1 => b" NeW ".to_vec(),
        2 => {
            let hex = b"0123456789abcdefABCDEFg";
            (0..32 + usize::from(input.u8() % 3) - 1)
                .map(|_| hex[usize::from(input.u8()) % hex.len()])
                .collect()
        }
        3 => input.u64().to_string().into_bytes(),
        4 => format!(" {} ", input.u64()).into_bytes(),
        _ => input.short().to_vec(),
    }
}

fn visible(v: &[u8]) -> Option<&str> {
    v.iter()
        .all(|&b| b == b'\t' || (32..127).contains(&b))
        .then(|| std::str::from_utf8(v).ok())
        .flatten()
}

fn model_ask(resume: Option<&[u8]>, received: Option<&[u8]>) -> ResumeAsk {
    let Some(v) = resume else {
        return ResumeAsk::None;
    };
    let Some(v) = visible(v) else {
        return ResumeAsk::Refused;
    };
    let v = v.trim();
    if v.eq_ignore_ascii_case("new") {
        return ResumeAsk::New;
    }
    let token = (v.len() == 32 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| v.to_owned());
    match received
        .and_then(visible)
        .and_then(|p| p.trim().parse::<u64>().ok())
    {
        Some(p) => ResumeAsk::Resume(token, p),
        None => ResumeAsk::Refused,
    }
}

/// Whether hyper accepts `v` as a header value at all.
fn header_ok(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || b >= 32 && b != 127)
}

fn headers(input: &mut Input) {
    let resume = input.bool().then(|| value(input));
    let received = input.bool().then(|| value(input));
    // Values hyper would not even parse never reach the gateway.
    if !resume.as_deref().is_none_or(header_ok) || !received.as_deref().is_none_or(header_ok) {
        return;
    }
    let mut list: Vec<(&str, &[u8])> = Vec::new();
    if let Some(v) = &resume {
        list.push(("X-Wsgw-Resume", v));
    }
    if let Some(v) = &received {
        list.push(("x-wsgw-received", v));
    }
    let want = model_ask(resume.as_deref(), received.as_deref());
    assert_eq!(resume_ask(&list), want, "{resume:?} {received:?}");
}

fn ring(input: &mut Input) {
    let max = usize::from(input.u16() % 4096);
    let mut ring = Ring::new(max);
    // The reference: every message ever pushed, and the oldest held.
    let mut all: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut oldest = 0usize;
    while !input.is_empty() {
        if !input.u8().is_multiple_of(4) {
            let payload = input.short().to_vec();
            let text = input.bool();
            let keep_from = match input.u8() % 3 {
                0 => u64::MAX,
                1 => all.len() as u64,
                _ => oldest as u64 + u64::from(input.u8() % 4),
            };
            let held_bytes = |all: &[(Vec<u8>, bool)], from: usize| -> usize {
                all[from..].iter().map(|(p, _)| p.len()).sum()
            };
            all.push((payload.clone(), text));
            let before = held_bytes(&all, oldest);
            while held_bytes(&all, oldest) + (all.len() - oldest) * 64 > max
                && all.len() - oldest > 1
                && (oldest as u64) < keep_from
            {
                oldest += 1;
            }
            let freed = ring.push(&payload, text, keep_from);
            assert_eq!(freed, before - held_bytes(&all, oldest), "bytes evicted");
        } else {
            let p = match input.u8() % 3 {
                0 => oldest as u64,
                1 => all.len() as u64 + u64::from(input.u8() % 2),
                _ => u64::from(input.u8()),
            };
            let want = if p > all.len() as u64 {
                Err("bad_position")
            } else if p < oldest as u64 {
                Err("gap")
            } else {
                Ok(all[p as usize..].to_vec())
            };
            let got = ring.since(p).map(|v| {
                v.into_iter()
                    .map(|(b, t)| (b.to_vec(), t))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, want, "since({p})");
        }
        assert_eq!(ring.next_seq(), all.len() as u64);
        assert_eq!(ring.oldest_held(), oldest as u64);
        assert_eq!(
            ring.bytes(),
            all[oldest..].iter().map(|(p, _)| p.len()).sum::<usize>()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    if input.bool() {
        headers(&mut input);
    } else {
        ring(&mut input);
    }
});
