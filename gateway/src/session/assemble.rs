//! Reassembly of fragmented client messages.

use bytes::{Bytes, BytesMut};
use fastwebsockets::OpCode;

use crate::close::CloseReason;

/// Reassembles fragmented messages with a cap on the total size, validating
/// UTF-8 of text messages incrementally so invalid text fails fast.
#[derive(Default)]
pub(crate) struct Assembler {
    /// Text (true) or binary (false) of the message in progress.
    text: Option<bool>,
    buf: BytesMut,
    /// Prefix of `buf` known to be valid UTF-8.
    checked: usize,
}

impl Assembler {
    pub(crate) fn push(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: BytesMut,
        max: usize,
    ) -> Result<Option<(Bytes, bool)>, CloseReason> {
        match (opcode, self.text) {
            (OpCode::Continuation, None) => {
                return Err(CloseReason::ClientProtocolError(
                    "continuation frame without a message to continue".into(),
                ))
            }
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(CloseReason::ClientProtocolError(
                    "new message before the previous one was finished".into(),
                ))
            }
            // An unfragmented message: no copy. fastwebsockets has already
            // validated UTF-8 of unfragmented text frames.
            (OpCode::Text | OpCode::Binary, None) if fin => {
                return Ok(Some((payload.freeze(), opcode == OpCode::Text)));
            }
            (OpCode::Text | OpCode::Binary, None) => {
                self.text = Some(opcode == OpCode::Text);
                self.buf = payload;
                self.checked = 0;
            }
            (OpCode::Close | OpCode::Ping | OpCode::Pong, _) => {
                return Err(CloseReason::ClientProtocolError(
                    "control frame in a message".into(),
                ))
            }
            (OpCode::Continuation, Some(_)) => {
                if self.buf.len() + payload.len() > max {
                    return Err(CloseReason::ClientMessageTooBig);
                }
                self.buf.extend_from_slice(&payload);
            }
        }
        if self.buf.len() > max {
            return Err(CloseReason::ClientMessageTooBig);
        }
        let text = self.text == Some(true);
        if text {
            match std::str::from_utf8(&self.buf[self.checked..]) {
                Ok(_) => self.checked = self.buf.len(),
                Err(e) if e.error_len().is_some() => return Err(CloseReason::ClientInvalidUtf8),
                Err(e) => self.checked += e.valid_up_to(),
            }
        }
        if !fin {
            return Ok(None);
        }
        if text && self.checked != self.buf.len() {
            return Err(CloseReason::ClientInvalidUtf8);
        }
        self.text = None;
        self.checked = 0;
        Ok(Some((std::mem::take(&mut self.buf).freeze(), text)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn b(s: &[u8]) -> BytesMut {
        BytesMut::from(s)
    }

    #[test]
    fn reassembles_fragments() {
        let mut a = Assembler::default();
        assert_eq!(a.push(OpCode::Text, false, b(b"he"), 100).unwrap(), None);
        assert_eq!(
            a.push(OpCode::Continuation, false, b(b"ll"), 100).unwrap(),
            None
        );
        let (msg, text) = a
            .push(OpCode::Continuation, true, b(b"o"), 100)
            .unwrap()
            .unwrap();
        assert_eq!(&msg[..], b"hello");
        assert!(text);
        // Ready for the next message.
        let (msg, text) = a
            .push(OpCode::Binary, true, b(&[1, 2]), 100)
            .unwrap()
            .unwrap();
        assert_eq!(&msg[..], &[1, 2]);
        assert!(!text);
    }

    #[test]
    fn total_size_is_capped_across_fragments() {
        let mut a = Assembler::default();
        a.push(OpCode::Binary, false, b(&[0; 60]), 100).unwrap();
        assert_eq!(
            a.push(OpCode::Continuation, true, b(&[0; 41]), 100),
            Err(CloseReason::ClientMessageTooBig)
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_fine_but_invalid_fails_fast() {
        let euro = "€".as_bytes(); // 3 bytes
        let mut a = Assembler::default();
        a.push(OpCode::Text, false, b(&euro[..1]), 100).unwrap();
        a.push(OpCode::Continuation, false, b(&euro[1..2]), 100)
            .unwrap();
        let (msg, _) = a
            .push(OpCode::Continuation, true, b(&euro[2..]), 100)
            .unwrap()
            .unwrap();
        assert_eq!(&msg[..], euro);

        let mut a = Assembler::default();
        assert_eq!(
            a.push(OpCode::Text, false, b(&[0xff]), 100),
            Err(CloseReason::ClientInvalidUtf8)
        );
        // Truncated sequence at the end of the message.
        let mut a = Assembler::default();
        a.push(OpCode::Text, false, b(b"ok"), 100).unwrap();
        assert_eq!(
            a.push(OpCode::Continuation, true, b(&euro[..2]), 100),
            Err(CloseReason::ClientInvalidUtf8)
        );
    }

    #[test]
    fn fragmentation_errors_are_protocol_errors() {
        let mut a = Assembler::default();
        assert!(matches!(
            a.push(OpCode::Continuation, true, b(b"x"), 100),
            Err(CloseReason::ClientProtocolError(_))
        ));
        let mut a = Assembler::default();
        a.push(OpCode::Text, false, b(b"x"), 100).unwrap();
        assert!(matches!(
            a.push(OpCode::Binary, true, b(b"y"), 100),
            Err(CloseReason::ClientProtocolError(_))
        ));
    }
}
