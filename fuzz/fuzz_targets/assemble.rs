//! Reassembly of fragmented client messages against a reference model:
//! the same messages, the size limit enforced at the first fragment that
//! passes it, and invalid UTF-8 in text reported exactly as early as the
//! bytes prove it (at the first fragment after which no continuation
//! could make the text valid, or at the last fragment if it ends inside a
//! character), never earlier, never later.
#![no_main]

use gateway::fuzzing::{Assembler, AssemblyError, Opcode};
use libfuzzer_sys::fuzz_target;
use wsgw_fuzz::Input;

/// The reference: the bytes of the message so far, nothing incremental.
#[derive(Default)]
struct Model {
    /// Text or binary of the message in progress.
    text: Option<bool>,
    buf: Vec<u8>,
}

/// Whether `b` is not the start of any valid UTF-8 text.
fn provably_invalid(b: &[u8]) -> bool {
    match std::str::from_utf8(b) {
        Ok(_) => false,
        // An incomplete last character may still be completed.
        Err(e) => e.error_len().is_some(),
    }
}

impl Model {
    fn push(
        &mut self,
        op: Opcode,
        fin: bool,
        payload: &[u8],
        max: usize,
    ) -> Result<Option<(Vec<u8>, bool)>, AssemblyError> {
        match (op, self.text) {
            (Opcode::Control, _) | (Opcode::Continuation, None) => {
                return Err(AssemblyError::Protocol)
            }
            (Opcode::Text | Opcode::Binary, Some(_)) => return Err(AssemblyError::Protocol),
            // Unfragmented: passed through (the WebSocket library already
            // checked its size and UTF-8).
            (Opcode::Text | Opcode::Binary, None) if fin => {
                return Ok(Some((payload.to_vec(), op == Opcode::Text)))
            }
            (Opcode::Text | Opcode::Binary, None) => {
                self.text = Some(op == Opcode::Text);
                self.buf = payload.to_vec();
            }
            (Opcode::Continuation, Some(_)) => self.buf.extend_from_slice(payload),
        }
        if self.buf.len() > max {
            return Err(AssemblyError::TooBig);
        }
        let text = self.text == Some(true);
        if text && provably_invalid(&self.buf) {
            return Err(AssemblyError::InvalidUtf8);
        }
        if !fin {
            return Ok(None);
        }
        if text && std::str::from_utf8(&self.buf).is_err() {
            return Err(AssemblyError::InvalidUtf8);
        }
        self.text = None;
        Ok(Some((std::mem::take(&mut self.buf), text)))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let max = usize::from(input.u8()) * 4;
    let mut gateway = Assembler::default();
    let mut model = Model::default();
    while !input.is_empty() {
        let b = input.u8();
        let op = match b % 8 {
            0..=2 => Opcode::Continuation,
            3 | 4 => Opcode::Text,
            5 | 6 => Opcode::Binary,
            _ => Opcode::Control,
        };
        let fin = b & 0x80 != 0;
        // Payloads rich in UTF-8 lead bytes and continuation bytes.
        let payload: Vec<u8> = input
            .short()
            .iter()
            .map(|&x| {
                if b & 0x40 != 0 {
                    x
                } else {
                    [b'a', 0xc3, 0xa9, 0xe2, 0x82, 0xac, 0xf0, 0x9f][usize::from(x % 8)]
                }
            })
            .collect();
        let got = gateway
            .push(op, fin, &payload, max)
            .map(|m| m.map(|(bytes, text)| (bytes.to_vec(), text)));
        let want = model.push(op, fin, &payload, max);
        assert_eq!(got, want, "{op:?} fin={fin} {payload:?}");
        if got.is_err() {
            // The session ends.
            return;
        }
    }
});
