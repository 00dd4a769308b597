//! WebSocket framing (RFC 6455), server side, sans-IO.
//!
//! Written here rather than taken from tungstenite or soketto because the shard must own the
//! connection's bytes: after authentication a socket moves to another core together with any
//! bytes already read, and an idle connection should hold no buffer at all (memory per
//! connection is a headline figure). Neither library exposes its unread buffer, and both keep
//! per-connection buffers. The decoder works on the caller's buffer; the encoder appends to
//! the caller's output.
//!
//! Limits: a message (after reassembly) is at most `max_message_bytes`; larger → 1009. Client
//! frames must be masked (1002), text must be UTF-8 (1007), control frames ≤ 125 bytes and
//! unfragmented (1002).

use hermod_shards::protocol::close;

/// What one complete client message or control frame was.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary,
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
}

/// A framing violation, with the close code it earns.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("websocket {reason} (close {code})")]
pub struct WsError {
    pub code: u16,
    pub reason: &'static str,
}

fn fail<T>(code: u16, reason: &'static str) -> Result<T, WsError> {
    Err(WsError { code, reason })
}

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Reassembly state of one connection. Empty (no allocation) between messages.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Opcode and payload of a fragmented message in progress.
    partial: Option<(u8, Vec<u8>)>,
}

impl Decoder {
    /// Decodes the next message from the front of `buf`. Returns the message and how many
    /// bytes it used, or `None` if `buf` holds no complete frame yet. Unmasks in place.
    pub fn decode(
        &mut self,
        buf: &mut [u8],
        max_message_bytes: usize,
    ) -> Result<Option<(Message, usize)>, WsError> {
        let mut used = 0;
        loop {
            let Some((fin, opcode, payload)) = next_frame(&mut buf[used..], max_message_bytes)?
            else {
                return Ok(None);
            };
            let (start, len, frame_len) = payload;
            let start = used + start;
            used += frame_len;
            let data = &buf[start..start + len];
            match opcode {
                OP_CLOSE | OP_PING | OP_PONG => {
                    if !fin || len > 125 {
                        return fail(
                            close::PROTOCOL_ERROR,
                            "control frame fragmented or too long",
                        );
                    }
                    let msg = match opcode {
                        OP_PING => Message::Ping(data.to_vec()),
                        OP_PONG => Message::Pong,
                        _ => match data.len() {
                            0 => Message::Close(None),
                            1 => return fail(close::PROTOCOL_ERROR, "close payload of one byte"),
                            _ => Message::Close(Some(u16::from_be_bytes([data[0], data[1]]))),
                        },
                    };
                    return Ok(Some((msg, used)));
                }
                OP_TEXT | OP_BINARY => {
                    if self.partial.is_some() {
                        return fail(close::PROTOCOL_ERROR, "new message inside a fragmented one");
                    }
                    if fin {
                        return Ok(Some((finish(opcode, data.to_vec())?, used)));
                    }
                    self.partial = Some((opcode, data.to_vec()));
                }
                OP_CONT => {
                    let Some((_, acc)) = self.partial.as_mut() else {
                        return fail(close::PROTOCOL_ERROR, "continuation without a message");
                    };
                    if acc.len() + len > max_message_bytes {
                        return fail(close::MESSAGE_TOO_BIG, "message too big");
                    }
                    acc.extend_from_slice(data);
                    if fin {
                        let (op, acc) = self.partial.take().expect("checked above");
                        return Ok(Some((finish(op, acc)?, used)));
                    }
                }
                _ => return fail(close::PROTOCOL_ERROR, "unknown opcode"),
            }
            // A non-final fragment was absorbed: keep going while whole frames remain.
        }
    }
}

fn finish(opcode: u8, payload: Vec<u8>) -> Result<Message, WsError> {
    if opcode == OP_BINARY {
        return Ok(Message::Binary);
    }
    String::from_utf8(payload)
        .map(Message::Text)
        .or_else(|_| fail(close::INVALID_PAYLOAD, "text is not UTF-8"))
}

/// Parses one frame header at the front of `buf`; if the whole frame is present, unmasks it
/// and returns (fin, opcode, (payload start, payload len, frame len)).
#[allow(clippy::type_complexity)]
fn next_frame(
    buf: &mut [u8],
    max: usize,
) -> Result<Option<(bool, u8, (usize, usize, usize))>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return fail(close::PROTOCOL_ERROR, "reserved bits set");
    }
    if b1 & 0x80 == 0 {
        return fail(close::PROTOCOL_ERROR, "client frame not masked");
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            (len, 10)
        }
        n => (n as u64, 2),
    };
    // Checked before waiting for the payload, so a huge frame costs nothing to refuse.
    if len > max as u64 {
        return fail(close::MESSAGE_TOO_BIG, "message too big");
    }
    let len = len as usize;
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    at += 4;
    for (i, byte) in buf[at..at + len].iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
    Ok(Some((b0 & 0x80 != 0, b0 & 0x0f, (at, len, at + len))))
}

fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

pub fn encode_text(out: &mut Vec<u8>, text: &str) {
    encode(out, OP_TEXT, text.as_bytes());
}

pub fn encode_ping(out: &mut Vec<u8>) {
    encode(out, OP_PING, b"hermod");
}

pub fn encode_pong(out: &mut Vec<u8>, payload: &[u8]) {
    encode(out, OP_PONG, payload);
}

pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut payload = code.to_be_bytes().to_vec();
    // Control payloads are at most 125 bytes; reasons here are short constants.
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    encode(out, OP_CLOSE, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mask = [1u8, 2, 3, 4];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    #[test]
    fn text_in_pieces_and_fragments() {
        let mut d = Decoder::default();
        let mut buf = client_frame(false, OP_TEXT, b"hel");
        buf.extend(client_frame(true, OP_PING, b"p"));
        buf.extend(client_frame(true, OP_CONT, b"lo"));
        let total = buf.len();
        assert_eq!(
            d.decode(&mut buf[..3], 100).unwrap(),
            None,
            "incomplete header"
        );
        let (msg, used) = d.decode(&mut buf, 100).unwrap().unwrap();
        assert_eq!(
            msg,
            Message::Ping(b"p".to_vec()),
            "control frames interleave with fragments"
        );
        let (msg, used2) = d.decode(&mut buf[used..], 100).unwrap().unwrap();
        assert_eq!(msg, Message::Text("hello".into()));
        assert_eq!(used + used2, total);
    }

    #[test]
    fn violations_get_their_close_codes() {
        let mut unmasked = client_frame(true, OP_TEXT, b"x");
        unmasked[1] &= 0x7f;
        assert_eq!(
            Decoder::default()
                .decode(&mut unmasked, 100)
                .unwrap_err()
                .code,
            close::PROTOCOL_ERROR
        );
        // A huge length is refused from the header alone.
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(
            Decoder::default().decode(&mut huge, 100).unwrap_err().code,
            close::MESSAGE_TOO_BIG
        );
        let mut bad_utf8 = client_frame(true, OP_TEXT, &[0xff, 0xfe]);
        assert_eq!(
            Decoder::default()
                .decode(&mut bad_utf8, 100)
                .unwrap_err()
                .code,
            close::INVALID_PAYLOAD
        );
        let mut cont = client_frame(true, OP_CONT, b"x");
        assert_eq!(
            Decoder::default().decode(&mut cont, 100).unwrap_err().code,
            close::PROTOCOL_ERROR
        );
        let mut big_ping = client_frame(true, OP_PING, &[0; 126]);
        assert_eq!(
            Decoder::default()
                .decode(&mut big_ping, 1000)
                .unwrap_err()
                .code,
            close::PROTOCOL_ERROR
        );
        let mut frag_over = client_frame(false, OP_TEXT, &[b'a'; 60]);
        frag_over.extend(client_frame(true, OP_CONT, &[b'a'; 60]));
        assert_eq!(
            Decoder::default()
                .decode(&mut frag_over, 100)
                .unwrap_err()
                .code,
            close::MESSAGE_TOO_BIG
        );
    }

    #[test]
    fn binary_and_close() {
        let mut buf = client_frame(true, OP_BINARY, &[1, 2, 3]);
        assert_eq!(
            Decoder::default().decode(&mut buf, 100).unwrap().unwrap().0,
            Message::Binary
        );
        let mut buf = client_frame(true, OP_CLOSE, &1000u16.to_be_bytes());
        assert_eq!(
            Decoder::default().decode(&mut buf, 100).unwrap().unwrap().0,
            Message::Close(Some(1000))
        );
    }

    #[test]
    fn encoder_lengths() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            encode_text(&mut out, &"a".repeat(n));
            let header = match n {
                n if n < 126 => 2,
                n if n <= 65535 => 4,
                _ => 10,
            };
            assert_eq!(out.len(), header + n);
            assert_eq!(out[0], 0x81);
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! Seeded random inputs through the decoder (a stable-toolchain stand-in for cargo-fuzz,
    //! which needs nightly): it must never panic, never claim more bytes than it was given,
    //! and a violation must carry a close code from RFC 6455's set.
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..300);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            // Bias towards plausible headers so the deeper paths run too.
            if rng.gen_bool(0.7) && buf.len() >= 2 {
                buf[0] = [0x81, 0x01, 0x80, 0x82, 0x88, 0x89, 0x8a, 0x00][rng.gen_range(0..8)];
                buf[1] |= 0x80;
            }
            let mut decoder = Decoder::default();
            let mut at = 0;
            loop {
                match decoder.decode(&mut buf[at..], 200) {
                    Ok(Some((_, used))) => {
                        assert!(used > 0 && at + used <= len);
                        at += used;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        assert!([1002, 1007, 1009].contains(&e.code), "{e}");
                        break;
                    }
                }
            }
        }
    }
}
