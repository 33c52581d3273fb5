//! The bytes of a load-test message, and their verification.
//!
//! Layout (big-endian): `conn: u32 | seq: u64 | t_ns: u64 | filler`, where
//! `t_ns` is the intended send time in nanoseconds since the run's epoch and
//! filler byte `i` (counting from the start of the message) is
//! `(conn + seq + i) mod 256`, so every byte of an echo can be checked
//! against what this connection sent. Text messages use the same layout
//! with the header written as hex digits and the filler mapped to
//! `a..z`, so they stay valid UTF-8.

/// Bytes of the binary header.
pub const HEADER: usize = 20;
/// Bytes of the text header (hex digits).
pub const TEXT_HEADER: usize = 40;

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Connection number within the run.
    pub conn: u32,
    /// Sequence number within the connection.
    pub seq: u64,
    /// Intended send time, ns since the run's epoch.
    pub t_ns: u64,
}

/// Why a received message is not what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// Shorter than a header, or not the size that was sent.
    Length(usize),
    /// Belongs to another connection.
    Session(u32),
    /// Out of order, duplicated or lost before it.
    Order {
        /// Expected sequence number.
        expected: u64,
        /// Received sequence number.
        got: u64,
    },
    /// Header fine, body bytes differ.
    Bytes,
}

/// Smallest message size that holds the header.
pub fn min_size(text: bool) -> usize {
    if text {
        TEXT_HEADER
    } else {
        HEADER
    }
}

fn filler(conn: u32, seq: u64, i: usize, text: bool) -> u8 {
    let v = (u64::from(conn)).wrapping_add(seq).wrapping_add(i as u64);
    if text {
        b'a' + (v % 26) as u8
    } else {
        v as u8
    }
}

/// Builds a message of `size` bytes (at least [`min_size`]).
pub fn encode(stamp: Stamp, size: usize, text: bool, out: &mut Vec<u8>) {
    out.clear();
    if text {
        out.extend_from_slice(
            format!("{:08x}{:016x}{:016x}", stamp.conn, stamp.seq, stamp.t_ns).as_bytes(),
        );
    } else {
        out.extend_from_slice(&stamp.conn.to_be_bytes());
        out.extend_from_slice(&stamp.seq.to_be_bytes());
        out.extend_from_slice(&stamp.t_ns.to_be_bytes());
    }
    let start = out.len();
    out.extend((start..size.max(start)).map(|i| filler(stamp.conn, stamp.seq, i, text)));
}

/// Reads the stamp of a message.
pub fn decode(msg: &[u8], text: bool) -> Option<Stamp> {
    if text {
        let h = std::str::from_utf8(msg.get(..TEXT_HEADER)?).ok()?;
        Some(Stamp {
            conn: u32::from_str_radix(&h[..8], 16).ok()?,
            seq: u64::from_str_radix(&h[8..24], 16).ok()?,
            t_ns: u64::from_str_radix(&h[24..40], 16).ok()?,
        })
    } else {
        let h = msg.get(..HEADER)?;
        Some(Stamp {
            conn: u32::from_be_bytes(h[0..4].try_into().ok()?),
            seq: u64::from_be_bytes(h[4..12].try_into().ok()?),
            t_ns: u64::from_be_bytes(h[12..20].try_into().ok()?),
        })
    }
}

/// Checks an echo against what connection `conn` sent as `expected_seq`,
/// with `size` bytes. Returns the stamp (for latency) when it matches.
pub fn verify(
    msg: &[u8],
    conn: u32,
    expected_seq: u64,
    size: usize,
    text: bool,
) -> Result<Stamp, Mismatch> {
    if msg.len() != size {
        return Err(Mismatch::Length(msg.len()));
    }
    let stamp = decode(msg, text).ok_or(Mismatch::Length(msg.len()))?;
    if stamp.conn != conn {
        return Err(Mismatch::Session(stamp.conn));
    }
    if stamp.seq != expected_seq {
        return Err(Mismatch::Order {
            expected: expected_seq,
            got: stamp.seq,
        });
    }
    let header = min_size(text);
    let body_ok = msg[header..]
        .iter()
        .enumerate()
        .all(|(k, b)| *b == filler(conn, stamp.seq, header + k, text));
    if body_ok {
        Ok(stamp)
    } else {
        Err(Mismatch::Bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        for text in [false, true] {
            let s = Stamp {
                conn: 7,
                seq: 42,
                t_ns: 123_456_789,
            };
            let mut m = Vec::new();
            encode(s, 64, text, &mut m);
            assert_eq!(m.len(), 64);
            if text {
                assert!(std::str::from_utf8(&m).is_ok());
            }
            assert_eq!(verify(&m, 7, 42, 64, text), Ok(s));
            assert_eq!(verify(&m, 8, 42, 64, text), Err(Mismatch::Session(7)));
            assert_eq!(
                verify(&m, 7, 41, 64, text),
                Err(Mismatch::Order {
                    expected: 41,
                    got: 42
                })
            );
            assert_eq!(verify(&m[..63], 7, 42, 64, text), Err(Mismatch::Length(63)));
            let mut bad = m.clone();
            bad[50] ^= 1;
            assert_eq!(verify(&bad, 7, 42, 64, text), Err(Mismatch::Bytes));
        }
    }

    #[test]
    fn header_only_messages() {
        let mut m = Vec::new();
        let s = Stamp {
            conn: 1,
            seq: 2,
            t_ns: 3,
        };
        encode(s, HEADER, false, &mut m);
        assert_eq!(verify(&m, 1, 2, HEADER, false), Ok(s));
    }
}

/// Continuity bookkeeping for one session's echoes: classifies every
/// sequence number as in order, duplicated, reordered, or skipping ahead
/// (the skipped ones count as lost unless they turn up later).
#[derive(Debug, Default)]
pub struct Continuity {
    /// The next sequence number expected in order.
    pub expected: u64,
    missing: std::collections::BTreeSet<u64>,
}

/// How one received sequence number relates to the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next one expected.
    InOrder,
    /// Later than expected: this many before it are missing (so far).
    Ahead(u64),
    /// Earlier than expected and never seen: it arrived out of order.
    Reordered,
    /// Seen before.
    Duplicate,
}

/// Gaps larger than this are not tracked one by one (they count as lost).
const MAX_TRACKED_GAP: u64 = 100_000;

impl Continuity {
    /// Records `seq`.
    pub fn observe(&mut self, seq: u64) -> Seen {
        if seq == self.expected {
            self.expected += 1;
            return Seen::InOrder;
        }
        if seq > self.expected {
            let gap = seq - self.expected;
            if gap <= MAX_TRACKED_GAP {
                self.missing.extend(self.expected..seq);
            }
            self.expected = seq + 1;
            return Seen::Ahead(gap);
        }
        if self.missing.remove(&seq) {
            Seen::Reordered
        } else {
            Seen::Duplicate
        }
    }

    /// Sequence numbers skipped and never received.
    pub fn lost(&self) -> u64 {
        self.missing.len() as u64
    }
}

#[cfg(test)]
mod continuity_tests {
    use super::*;

    #[test]
    fn classifies_every_case() {
        let mut c = Continuity::default();
        assert_eq!(c.observe(0), Seen::InOrder);
        assert_eq!(c.observe(1), Seen::InOrder);
        assert_eq!(c.observe(1), Seen::Duplicate);
        assert_eq!(c.observe(4), Seen::Ahead(2));
        assert_eq!(c.lost(), 2);
        assert_eq!(c.observe(2), Seen::Reordered);
        assert_eq!(c.lost(), 1);
        assert_eq!(c.observe(2), Seen::Duplicate);
        assert_eq!(c.observe(5), Seen::InOrder);
        assert_eq!(c.expected, 6);
    }
}
