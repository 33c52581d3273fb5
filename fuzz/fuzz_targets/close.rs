//! The close-code table: for every way a session ends, with any peer code
//! and reason, what the client and the backend are told.
//!
//! Invariants: a code sent to a client is one a server may send on the
//! wire (RFC 6455 7.4 and the IANA registry: never 1004, 1005, 1006, 1015
//! or an unassigned code); its reason is at most 123 bytes (a close frame's
//! payload is at most 125), cut at a character boundary as late as
//! possible; a backend's own code reaches the client exactly when the
//! contract allows it, 1011 otherwise; a reason given to the backend that
//! it will echo is cut the same way. The client-code check agrees with an
//! independent table over every `u16`.
#![no_main]

use gateway::fuzzing::{client_code_allowed, close_decision, CLOSE_KINDS};
use libfuzzer_sys::fuzz_target;
use wsgw_fuzz::Input;

/// Codes a server may put in a close frame.
fn sendable(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Codes the contract lets a backend pass to its client (4000 is the
/// gateway's own "resume now": a backend's becomes 1011).
fn backend_may_send(code: u32) -> bool {
    matches!(
        code,
        1000..=1003 | 1007..=1009 | 1011..=1014 | 3000..=3999 | 4001..=4999
    )
}

/// `reason` cut to 123 bytes at the last character boundary.
fn cut(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    if data.is_empty() {
        for code in 0..=u16::MAX {
            assert_eq!(client_code_allowed(code), sendable(code), "{code}");
        }
        return;
    }
    let kind = input.u8() % CLOSE_KINDS;
    let code = match input.u8() % 3 {
        0 => u32::from(input.u16()),
        1 => 995 + u32::from(input.u8() % 25),
        _ => input.u32(),
    };
    let reason = String::from_utf8_lossy(input.rest()).into_owned();
    let d = close_decision(kind, code, &reason);
    if let Some((c, r)) = &d.to_client {
        assert!(sendable(*c), "{kind}: code {c} sent to a client");
        assert!(r.len() <= 123, "{kind}: reason of {} bytes", r.len());
        assert!(2 + r.len() <= 125);
    }
    match d.label {
        "backend_closed" => {
            let (c, r) = d.to_client.expect("the client is told");
            if backend_may_send(code) {
                assert_eq!(u32::from(c), code);
                assert_eq!(r, cut(&reason), "the backend's reason, cut");
            } else {
                assert_eq!(c, 1011);
                assert_eq!(r, format!("backend sent invalid close code {code}"));
            }
            assert!(d.to_backend.is_none(), "the backend closed it");
        }
        "client_closed" => {
            assert!(d.to_client.is_none(), "the client closed it");
            let (c, r) = d.to_backend.expect("the backend is told");
            assert_eq!(u32::from(c), code.min(u32::from(u16::MAX)));
            assert_eq!(r, reason);
        }
        "client_protocol_error" | "backend_invalid" => {
            let (_, r) = d.to_client.expect("the client is told");
            assert_eq!(r, cut(&reason));
            if let Some((_, b)) = d.to_backend {
                assert_eq!(b, cut(&reason));
            }
        }
        "client_lost" | "client_timeout" => {
            assert!(d.to_client.is_none());
            assert_eq!(d.to_backend.map(|b| b.0), Some(1006));
        }
        "link_lost" => {
            assert_eq!(d.to_client.map(|c| c.0), Some(1012), "reconnect");
            assert!(d.to_backend.is_none(), "the link is gone");
        }
        _ => {}
    }
});
