//! Fuzz harnesses for the bytes a client controls before the engine sees them: WebSocket
//! frames and the HTTP request head. Each takes arbitrary bytes and asserts what must hold
//! for any input; a violation panics.
//!
//! `fuzz/` runs them under libFuzzer (cargo-fuzz, nightly toolchain); the tests below run
//! them on seeded random and mutated inputs with the stable toolchain in every CI run. The
//! engine's request parsing has its harness in `hermod_shards::fuzzing`.

use crate::http::{self, Route, HEAD_BYTES_MAX};
use crate::ws::{Decoder, Message};

/// What decoding a byte stream produced: its messages, then the close code of the violation
/// that stopped it, if any.
type Outcome = (Vec<Message<'static>>, Option<u16>);

/// The largest message the harness allows (small, so the 1009 paths run often).
const FUZZ_MESSAGE_BYTES_MAX: usize = 256;

/// Decodes `stream` delivered as `reads` the way the connection loop does (append, decode
/// until nothing more, drop what was consumed); `suspend_after` moves the decoder's state
/// through [`Decoder::suspend`] after that read, as a hand-off to another shard does.
fn decode_reads(stream: &[u8], cuts: &[usize], suspend_after: Option<usize>) -> Outcome {
    let mut decoder = Decoder::default();
    let mut inbuf = Vec::new();
    let mut msgs = Vec::new();
    let mut start = 0;
    for (read, &end) in cuts.iter().chain([&stream.len()]).enumerate() {
        inbuf.extend_from_slice(&stream[start..end]);
        start = end;
        let mut used = 0;
        loop {
            let len = inbuf.len();
            match decoder.decode(&mut inbuf[used..], FUZZ_MESSAGE_BYTES_MAX) {
                Ok((msg, n)) => {
                    assert!(used + n <= len, "consumed more than it was given");
                    used += n;
                    match msg {
                        Some(Message::Close(Some(code))) => {
                            assert!(crate::ws::close_code_valid(code));
                            msgs.push(Message::Close(Some(code)));
                        }
                        Some(Message::Text(t)) => {
                            assert!(t.len() <= FUZZ_MESSAGE_BYTES_MAX);
                            msgs.push(Message::Text(t).into_owned());
                        }
                        Some(m) => msgs.push(m.into_owned()),
                        None => break,
                    }
                }
                Err(e) => {
                    assert!([1002, 1003, 1007, 1009].contains(&e.code), "{e}");
                    return (msgs, Some(e.code));
                }
            }
        }
        inbuf.drain(..used);
        if suspend_after == Some(read) {
            inbuf = std::mem::take(&mut decoder).suspend(inbuf);
        }
    }
    (msgs, None)
}

/// WebSocket frames: `data[0]` picks how many reads the rest arrives in and `data[1..9]`
/// where it is cut; `data[9]` whether the decoder is suspended and resumed in between.
/// Whatever the bytes, however they are split, the decoder never panics, never consumes
/// more than it was given, refuses only with 1002/1003/1007/1009, and produces exactly what
/// it produces from the same bytes in one read.
pub fn ws_stream(data: &[u8]) {
    if data.len() < 10 {
        return;
    }
    let (control, stream) = data.split_at(10);
    let reads = 1 + control[0] as usize % 8;
    let mut cuts: Vec<usize> = control[1..reads]
        .iter()
        .map(|&c| c as usize * stream.len() / 255)
        .collect();
    cuts.sort_unstable();
    let suspend_after = (control[9] & 1 == 1).then_some(control[9] as usize / 2 % reads);
    let whole = decode_reads(stream, &[], None);
    let split = decode_reads(stream, &cuts, suspend_after);
    assert_eq!(
        whole, split,
        "cut at {cuts:?}, suspended after {suspend_after:?}"
    );
}

/// The HTTP head: `route` never panics; it waits for more only below `HEAD_BYTES_MAX`; an
/// upgrade or admin request never claims more head than it was given or than the limit;
/// and the same bytes read in two parts route the same once complete.
pub fn http_head(data: &[u8]) {
    let Some(route) = http::route(data) else {
        assert!(data.len() < HEAD_BYTES_MAX, "waits for more past the limit");
        return;
    };
    let head_len = match &route {
        Route::Upgrade { head_len, .. } => Some(*head_len),
        Route::Admin(req) | Route::Bot(req) => Some(req.head_len),
        Route::Media(req) => Some(req.head_len),
        Route::Respond(r) => {
            assert!(r.starts_with(b"HTTP/1.1 "), "a response has a status line");
            None
        }
        Route::Status(_) => None,
    };
    if let Some(head_len) = head_len {
        assert!(head_len <= data.len() && head_len <= HEAD_BYTES_MAX);
        // Bytes after the head do not change the decision.
        assert_eq!(http::route(&data[..head_len]), Some(route));
    }
}

#[cfg(test)]
mod tests {
    //! Seeded stand-ins for the fuzzers: random bytes biased towards plausible frames and
    //! heads, split reads, fragment sequences.
    use rand::{Rng, SeedableRng};

    use crate::ws::{encode_masked, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};

    /// A plausible client stream: a run of frames, mostly well formed, with fragment
    /// sequences, interleaved control frames, bad UTF-8, bad close codes, bad bits.
    fn frames(rng: &mut impl Rng) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rng.gen_range(1..8) {
            let opcode = [
                OP_TEXT, OP_CONT, OP_CONT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, 3,
            ][rng.gen_range(0..8)];
            let len = match rng.gen_range(0..10) {
                0 => rng.gen_range(120..300),
                _ => rng.gen_range(0..40),
            };
            let mut payload: Vec<u8> = match rng.gen_range(0..4) {
                0 => (0..len).map(|_| rng.gen()).collect(),
                1 => "añ€😀".repeat(len / 8 + 1).into_bytes()[..len].to_vec(),
                _ => (0..len).map(|_| rng.gen_range(b'a'..=b'z')).collect(),
            };
            if opcode == OP_CLOSE && rng.gen_bool(0.7) {
                let code: u16 = [1000, 1001, 1005, 1016, 3000, 4001, 5000][rng.gen_range(0..7)];
                payload.splice(0..payload.len().min(2), code.to_be_bytes());
                payload.truncate(rng.gen_range(2..30));
            }
            let fin = rng.gen_bool(0.6);
            let start = out.len();
            encode_masked(&mut out, fin, opcode, &payload, rng.gen());
            if rng.gen_bool(0.05) {
                out[start] |= 0x10 << rng.gen_range(0..3); // a reserved bit
            }
            if rng.gen_bool(0.03) {
                out[start + 1] &= 0x7f; // unmasked
            }
        }
        out
    }

    #[test]
    fn ws_streams_split_anyhow_decode_the_same() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for round in 0..30_000 {
            let mut data: Vec<u8> = (0..10).map(|_| rng.gen()).collect();
            if round % 5 == 0 {
                data.extend((0..rng.gen_range(0..300)).map(|_| rng.gen::<u8>()));
            } else {
                data.extend(frames(&mut rng));
            }
            super::ws_stream(&data);
        }
    }

    #[test]
    fn http_heads_route_without_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x4ead);
        let seeds: [&[u8]; 4] = [
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            b"POST /admin/users HTTP/1.1\r\nAuthorization: Bearer abc\r\nContent-Length: 12\r\n\r\n{\"users\":[]}",
            b"GET /metrics HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: y\r\n\r\n",
        ];
        for _ in 0..30_000 {
            let mut data = seeds[rng.gen_range(0..seeds.len())].to_vec();
            for _ in 0..rng.gen_range(0..6) {
                let at = rng.gen_range(0..=data.len());
                match rng.gen_range(0..5) {
                    0 if at < data.len() => data[at] = rng.gen(),
                    1 if at < data.len() => {
                        data.remove(at);
                    }
                    2 => data.splice(at..at, *b"X-Pad: 1\r\n").for_each(drop),
                    3 => data
                        .splice(at..at, vec![b'a'; rng.gen_range(0..9000)])
                        .for_each(drop),
                    _ => data.insert(at, b"\r\n: /"[rng.gen_range(0..5)]),
                }
            }
            super::http_head(&data);
        }
    }
}
