//! WebSocket framing (RFC 6455), server side, sans-IO.
//!
//! Written here rather than taken from tungstenite or soketto because the shard must own the
//! connection's bytes: after authentication a socket moves to another core together with any
//! bytes already read, and an idle connection should hold no buffer at all (memory per
//! connection is a headline figure). Neither library exposes its unread buffer, and both keep
//! per-connection buffers. The decoder works on the caller's buffer; the encoder appends to
//! the caller's output.
//!
//! What a client frame earns (RFC 6455 §5, §7.4; the case list in `tests/conformance.rs`):
//! - a message (after reassembly) over `max_message_bytes` → 1009, judged from the frame
//!   header, so a huge frame costs nothing to refuse;
//! - a binary message → 1003 at its first frame (Hermod speaks JSON text only);
//! - text that is not UTF-8 → 1007, as soon as the bytes received so far cannot start valid
//!   UTF-8 (fragments are checked as they arrive, not only once complete);
//! - unmasked frames, reserved bits, unknown opcodes, a continuation with no message, a new
//!   message inside a fragmented one, control frames fragmented or over 125 bytes → 1002;
//! - a close frame with a one-byte payload or a code that may not be sent (§7.4.1–2) → 1002;
//!   a close reason that is not UTF-8 → 1007.
//!
//! Fragments are consumed from the caller's buffer as they arrive (the decoder keeps the
//! message so far), so a fragmented message may span any number of socket reads.

use std::borrow::Cow;

use hermod_shards::protocol::close;

/// What one complete client message or control frame was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// An unfragmented message is borrowed from the connection's buffer (unmasked in place):
    /// no allocation or copy per frame. A reassembled one is owned.
    Text(Cow<'a, str>),
    Ping(Vec<u8>),
    Pong,
    /// A close frame with its (valid) code, if it had one.
    Close(Option<u16>),
}

impl Message<'_> {
    /// The message, no longer borrowing the connection's buffer.
    pub fn into_owned(self) -> Message<'static> {
        match self {
            Message::Text(text) => Message::Text(Cow::Owned(text.into_owned())),
            Message::Ping(payload) => Message::Ping(payload),
            Message::Pong => Message::Pong,
            Message::Close(code) => Message::Close(code),
        }
    }
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

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest control frame payload (§5.5).
const CONTROL_BYTES_MAX: usize = 125;

/// Whether a client may send this close code (§7.4.1, §7.4.2 and IANA's registry): 1004–1006
/// and 1015 are reserved for local use, 1016–2999 unassigned, 3000–4999 for libraries and
/// applications.
pub fn close_code_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Reassembly state of one connection. Empty (no allocation) between messages.
#[derive(Debug, Default)]
pub struct Decoder {
    partial: Option<Partial>,
}

/// A fragmented text message in progress.
#[derive(Debug)]
struct Partial {
    payload: Vec<u8>,
    /// `payload[..utf8_valid]` is known to be valid UTF-8 and ends on a character boundary.
    utf8_valid: usize,
}

impl Partial {
    /// Checks the bytes added since the last check; an incomplete character at the end is
    /// fine (the next fragment may finish it), an impossible sequence is not.
    fn check_utf8(&mut self) -> Result<(), WsError> {
        match std::str::from_utf8(&self.payload[self.utf8_valid..]) {
            Ok(_) => self.utf8_valid = self.payload.len(),
            Err(e) if e.error_len().is_none() => self.utf8_valid += e.valid_up_to(),
            Err(_) => return fail(close::INVALID_PAYLOAD, "text is not UTF-8"),
        }
        Ok(())
    }
}

impl Decoder {
    /// Decodes from the front of `buf`: returns the next complete message, if there is one,
    /// and how many bytes of `buf` were consumed. Bytes are consumed even without a message
    /// (the fragments of a message still in progress, now held by the decoder), so the caller
    /// must always drop the consumed bytes. Unmasks in place.
    pub fn decode<'a>(
        &mut self,
        buf: &'a mut [u8],
        max_message_bytes: usize,
    ) -> Result<(Option<Message<'a>>, usize), WsError> {
        let mut used = 0;
        // Where a whole unfragmented text message lies in `buf`: borrowed after the loop,
        // once the loop's mutable borrows of `buf` are over.
        let text = loop {
            // A fragment may add only what is left of the message's allowance.
            let held = self.partial.as_ref().map_or(0, |p| p.payload.len());
            let Some(frame) = next_frame(&mut buf[used..], max_message_bytes - held)? else {
                return Ok((None, used));
            };
            let range = used + frame.start..used + frame.start + frame.len;
            let data = &buf[range.clone()];
            used += frame.total;
            match frame.opcode {
                OP_CLOSE | OP_PING | OP_PONG => {
                    // `next_frame` checked: final, at most 125 bytes.
                    let msg = match frame.opcode {
                        OP_PING => Message::Ping(data.to_vec()),
                        OP_PONG => Message::Pong,
                        _ => Message::Close(close_payload(data)?),
                    };
                    return Ok((Some(msg), used));
                }
                OP_TEXT | OP_BINARY => {
                    if self.partial.is_some() {
                        return fail(close::PROTOCOL_ERROR, "new message inside a fragmented one");
                    }
                    if frame.opcode == OP_BINARY {
                        return fail(close::UNSUPPORTED_DATA, "text frames only");
                    }
                    if frame.fin {
                        break range;
                    }
                    let mut partial = Partial {
                        payload: data.to_vec(),
                        utf8_valid: 0,
                    };
                    partial.check_utf8()?;
                    self.partial = Some(partial);
                }
                OP_CONT => {
                    let Some(partial) = self.partial.as_mut() else {
                        return fail(close::PROTOCOL_ERROR, "continuation without a message");
                    };
                    partial.payload.extend_from_slice(data);
                    partial.check_utf8()?;
                    if frame.fin {
                        let partial = self.partial.take().expect("checked above");
                        if partial.utf8_valid != partial.payload.len() {
                            return fail(close::INVALID_PAYLOAD, "text is not UTF-8");
                        }
                        let text = String::from_utf8(partial.payload)
                            .expect("every byte was checked as it arrived");
                        return Ok((Some(Message::Text(Cow::Owned(text))), used));
                    }
                }
                _ => return fail(close::PROTOCOL_ERROR, "unknown opcode"),
            }
            // A non-final fragment was absorbed: keep going while whole frames remain.
        };
        let buf: &'a [u8] = buf;
        match std::str::from_utf8(&buf[text]) {
            Ok(text) => Ok((Some(Message::Text(Cow::Borrowed(text))), used)),
            Err(_) => fail(close::INVALID_PAYLOAD, "text is not UTF-8"),
        }
    }

    /// Gives up the decoder for `rest`, the connection's undecoded bytes, when the socket
    /// moves to another shard: a fragmented message in progress is re-encoded in front of
    /// them as the non-final frame it arrived as (masked with zeros), so the new shard's
    /// decoder picks it up where this one stopped.
    pub fn suspend(self, rest: Vec<u8>) -> Vec<u8> {
        let Some(partial) = self.partial else {
            return rest;
        };
        let mut out = Vec::with_capacity(partial.payload.len() + 14 + rest.len());
        encode_masked(&mut out, false, OP_TEXT, &partial.payload, [0; 4]);
        out.extend_from_slice(&rest);
        out
    }
}

/// A close frame's payload: nothing, or a code a client may send and a UTF-8 reason.
fn close_payload(data: &[u8]) -> Result<Option<u16>, WsError> {
    match data {
        [] => Ok(None),
        [_] => fail(close::PROTOCOL_ERROR, "close payload of one byte"),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_valid(code) {
                return fail(close::PROTOCOL_ERROR, "invalid close code");
            }
            if std::str::from_utf8(reason).is_err() {
                return fail(close::INVALID_PAYLOAD, "close reason is not UTF-8");
            }
            Ok(Some(code))
        }
    }
}

/// One complete frame at the front of a buffer, unmasked in place.
struct Frame {
    fin: bool,
    opcode: u8,
    /// Payload offset and length within the buffer given to `next_frame`.
    start: usize,
    len: usize,
    /// Header and payload.
    total: usize,
}

/// Parses one frame header at the front of `buf`; if the whole frame is present, unmasks it.
/// A payload over `max` bytes is refused from the header alone.
fn next_frame(buf: &mut [u8], max: usize) -> Result<Option<Frame>, WsError> {
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
    let opcode = b0 & 0x0f;
    if opcode & 0x8 != 0 {
        // Control frames interleave with a fragmented message and do not count against it.
        if b0 & 0x80 == 0 || len > CONTROL_BYTES_MAX as u64 {
            return fail(
                close::PROTOCOL_ERROR,
                "control frame fragmented or too long",
            );
        }
    } else if len > max as u64 {
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
    Ok(Some(Frame {
        fin: b0 & 0x80 != 0,
        opcode,
        start: at,
        len,
        total: at + len,
    }))
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

/// A client's frame: masked with `mask`, final or not. The server never sends one; it is here
/// for `suspend`, the conformance tests and the fuzz harnesses.
pub fn encode_masked(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let at = out.len();
    encode(out, opcode, payload);
    if !fin {
        out[at] &= 0x7f;
    }
    out[at + 1] |= 0x80;
    let header_end = out.len() - payload.len();
    out.splice(header_end..header_end, mask);
    for (i, byte) in out[header_end + 4..].iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
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

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_masked(&mut out, fin, opcode, payload, [1, 2, 3, 4]);
        out
    }

    /// Decodes `buf` delivered in `reads` the way the connection loop does (append, decode
    /// until nothing more, drop what was consumed): the messages, then the error if any.
    fn run(reads: &[&[u8]], max: usize) -> (Vec<Message<'static>>, Option<u16>) {
        let mut d = Decoder::default();
        let mut inbuf = Vec::new();
        let mut msgs = Vec::new();
        for read in reads {
            inbuf.extend_from_slice(read);
            let mut used = 0;
            loop {
                match d.decode(&mut inbuf[used..], max) {
                    Ok((msg, n)) => {
                        used += n;
                        match msg {
                            Some(m) => msgs.push(m.into_owned()),
                            None => break,
                        }
                    }
                    Err(e) => return (msgs, Some(e.code)),
                }
            }
            inbuf.drain(..used);
        }
        (msgs, None)
    }

    #[test]
    fn fragments_across_reads_at_every_split() {
        let mut buf = frame(false, OP_TEXT, "hé".as_bytes());
        buf.extend(frame(true, OP_PING, b"p"));
        buf.extend(frame(false, OP_CONT, "l€".as_bytes()));
        buf.extend(frame(true, OP_CONT, b"o"));
        buf.extend(frame(true, OP_TEXT, b"next"));
        let want = vec![
            Message::Ping(b"p".to_vec()),
            Message::Text("hél€o".into()),
            Message::Text("next".into()),
        ];
        for a in 0..=buf.len() {
            for b in a..=buf.len() {
                let got = run(&[&buf[..a], &buf[a..b], &buf[b..]], 100);
                assert_eq!(got, (want.clone(), None), "split at {a}, {b}");
            }
        }
    }

    #[test]
    fn a_full_size_message_in_two_fragments_in_one_read() {
        let max = 64 * 1024;
        let half = vec![b'a'; max / 2];
        let mut buf = frame(false, OP_TEXT, &half);
        buf.extend(frame(true, OP_CONT, &half));
        let (msgs, err) = run(&[&buf], max);
        assert_eq!(err, None);
        assert!(matches!(&msgs[..], [Message::Text(t)] if t.len() == max));
        // One byte more is refused from the second fragment's header.
        let mut over = frame(false, OP_TEXT, &half);
        over.extend(frame(true, OP_CONT, &[b'a'; 64 * 1024 / 2 + 1][..]));
        assert_eq!(run(&[&over[..over.len() - 100]], max).1, Some(1009));
    }

    #[test]
    fn violations_get_their_close_codes() {
        let code = |buf: &[u8]| run(&[buf], 100).1;
        let mut unmasked = frame(true, OP_TEXT, b"x");
        unmasked[1] &= 0x7f;
        assert_eq!(code(&unmasked), Some(1002));
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(code(&huge), Some(1009), "refused from the header alone");
        assert_eq!(code(&frame(true, OP_TEXT, &[0xff, 0xfe])), Some(1007));
        assert_eq!(code(&frame(true, OP_CONT, b"x")), Some(1002));
        assert_eq!(code(&frame(true, OP_PING, &[0; 126])), Some(1002));
        assert_eq!(code(&frame(false, OP_PING, b"")), Some(1002));
        assert_eq!(code(&frame(true, 0x3, b"")), Some(1002), "reserved opcode");
        assert_eq!(code(&frame(true, 0xB, b"")), Some(1002), "reserved control");
        let mut rsv = frame(true, OP_TEXT, b"x");
        rsv[0] |= 0x40;
        assert_eq!(code(&rsv), Some(1002));
        let mut frag_over = frame(false, OP_TEXT, &[b'a'; 60]);
        frag_over.extend(frame(true, OP_CONT, &[b'a'; 60]));
        assert_eq!(code(&frag_over), Some(1009));
        let mut nested = frame(false, OP_TEXT, b"a");
        nested.extend(frame(true, OP_TEXT, b"b"));
        assert_eq!(code(&nested), Some(1002));
    }

    #[test]
    fn binary_is_refused_at_its_first_fragment() {
        assert_eq!(run(&[&frame(true, OP_BINARY, &[1])], 100).1, Some(1003));
        assert_eq!(run(&[&frame(false, OP_BINARY, &[1])], 100).1, Some(1003));
    }

    #[test]
    fn invalid_utf8_fails_fast_even_split_inside_a_character() {
        // "€" is E2 82 AC: split across fragments it is fine.
        let mut ok = frame(false, OP_TEXT, &[b'a', 0xE2]);
        ok.extend(frame(false, OP_CONT, &[0x82]));
        ok.extend(frame(true, OP_CONT, &[0xAC]));
        assert_eq!(run(&[&ok], 100), (vec![Message::Text("a€".into())], None));
        // An impossible byte fails at its fragment, before the message ends.
        let bad = frame(false, OP_TEXT, &[b'a', 0xC0, 0x80]);
        assert_eq!(run(&[&bad], 100).1, Some(1007));
        let mut split = frame(false, OP_TEXT, &[0xE2]);
        split.extend(frame(false, OP_CONT, &[0x28]));
        assert_eq!(run(&[&split], 100).1, Some(1007));
        // A character left unfinished by the final fragment.
        let mut unfinished = frame(false, OP_TEXT, b"a");
        unfinished.extend(frame(true, OP_CONT, &[0xE2, 0x82]));
        assert_eq!(run(&[&unfinished], 100).1, Some(1007));
    }

    #[test]
    fn close_frames_are_validated() {
        let close = |payload: &[u8]| run(&[&frame(true, OP_CLOSE, payload)], 100);
        assert_eq!(close(b""), (vec![Message::Close(None)], None));
        assert_eq!(close(&[3]).1, Some(1002), "one-byte payload");
        for ok in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            let mut p = ok.to_be_bytes().to_vec();
            p.extend_from_slice("ciao ✓".as_bytes());
            assert_eq!(close(&p), (vec![Message::Close(Some(ok))], None), "{ok}");
        }
        for bad in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535,
        ] {
            assert_eq!(close(&bad.to_be_bytes()).1, Some(1002), "{bad}");
        }
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(&[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xff]);
        assert_eq!(close(&bad_reason).1, Some(1007));
    }

    #[test]
    fn suspend_carries_a_fragment_in_progress() {
        let mut buf = frame(false, OP_TEXT, &[b'x', 0xE2]);
        let mut d = Decoder::default();
        let len = buf.len();
        let (msg, used) = d.decode(&mut buf, 100).unwrap();
        assert_eq!((msg, used), (None, len), "the fragment is consumed");
        let rest = frame(true, OP_CONT, &[0x82, 0xAC]);
        let moved = d.suspend(rest);
        assert_eq!(
            run(&[&moved], 100),
            (vec![Message::Text("x€".into())], None)
        );
        assert_eq!(Decoder::default().suspend(b"raw".to_vec()), b"raw");
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
