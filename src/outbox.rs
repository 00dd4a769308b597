//! A connection's outbox: the frames the engine queued for it and what it decided about it (a
//! close, a hand-off), shared between the driver's `dispatch` (which fills it) and the
//! connection's task (which drains it to the socket). A leaf.
//!
//! Policy: at most `OUTBOX_BYTES_MAX` bytes queued; a push beyond it closes the connection
//! (4001, slow consumer) — the device loses nothing, it syncs on reconnect.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::task::Waker;

use hermod_shards::engine::Handoff;
use hermod_shards::limits::OUTBOX_BYTES_MAX;
use hermod_shards::protocol::close;
use hermod_shards::ShardId;

use crate::ws;

/// Frames waiting to be written to one connection, and what the engine decided about it.
#[derive(Default)]
pub struct Outbox {
    inner: RefCell<OutboxInner>,
}

#[derive(Default)]
struct OutboxInner {
    bytes: Vec<u8>,
    waker: Option<Waker>,
    close: Option<Close>,
    handoff: Option<(ShardId, Handoff)>,
    /// The socket, while the connection's task serves it as a WebSocket (`WriteThrough`):
    /// frames may then be written to it at once, from `dispatch`, instead of waking the task.
    fd: Option<RawFd>,
    /// The task took bytes and is writing them: anything new must queue behind them.
    writing: bool,
}

/// While alive, the outbox may write straight to the connection's socket. Created by the
/// connection's task once the socket is a WebSocket, and dropped before the socket closes or
/// moves: the fd is never written after it could have been reused.
pub struct WriteThrough<'a>(&'a Outbox);

impl Drop for WriteThrough<'_> {
    fn drop(&mut self) {
        self.0.inner.borrow_mut().fd = None;
    }
}

impl Outbox {
    /// Lets frames be written straight to `fd` (the connection's WebSocket) while the guard
    /// lives; see `WriteThrough`.
    pub fn write_through(&self, fd: RawFd) -> WriteThrough<'_> {
        self.inner.borrow_mut().fd = Some(fd);
        WriteThrough(self)
    }

    /// Queues a text frame; false (and the connection is being closed) if the outbox is full.
    ///
    /// When nothing is queued or being written, the frame is written to the socket at once
    /// with a non-blocking `send`: a push to a connection whose task is idle costs no wake-up
    /// and no turn of that task (one message to a group reaches thousands of idle sockets).
    /// What the kernel does not take at once is queued for the task, which writes it in order.
    pub fn push_text(&self, text: &str) -> bool {
        let mut inner = self.inner.borrow_mut();
        if inner.close.is_some() {
            return true;
        }
        if let (Some(fd), false, true, None) = (
            inner.fd,
            inner.writing,
            inner.bytes.is_empty(),
            inner.handoff.as_ref(),
        ) {
            ws::encode_text(&mut inner.bytes, text);
            // SAFETY: `fd` is the open socket of this connection (`WriteThrough`), and the
            // buffer is valid for its length. MSG_DONTWAIT: never blocks the reactor.
            let sent = unsafe {
                libc::send(
                    fd,
                    inner.bytes.as_ptr().cast(),
                    inner.bytes.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            match usize::try_from(sent) {
                Ok(n) if n == inner.bytes.len() => inner.bytes.clear(),
                Ok(n) => {
                    inner.bytes.drain(..n);
                    wake(&mut inner);
                }
                // Full, or failing: the task writes it (and meets the error, if any).
                Err(_) => wake(&mut inner),
            }
            return true;
        }
        if inner.bytes.len() + text.len() > OUTBOX_BYTES_MAX {
            inner.close = Some(Close {
                code: close::SLOW_CONSUMER,
                reason: close::reason::OUTBOX_FULL,
                by_peer: false,
            });
            inner.bytes.clear();
            wake(&mut inner);
            return false;
        }
        ws::encode_text(&mut inner.bytes, text);
        wake(&mut inner);
        true
    }

    pub fn push_ping(&self) {
        let mut inner = self.inner.borrow_mut();
        ws::encode_ping(&mut inner.bytes);
        wake(&mut inner);
    }

    pub fn push_pong(&self, payload: &[u8]) {
        let mut inner = self.inner.borrow_mut();
        ws::encode_pong(&mut inner.bytes, payload);
    }

    pub fn close(&self, code: u16, reason: &'static str) {
        let mut inner = self.inner.borrow_mut();
        inner.close.get_or_insert(Close {
            code,
            reason,
            by_peer: false,
        });
        wake(&mut inner);
    }

    /// Answers the client's close frame with its own code.
    pub fn close_echo(&self, code: u16) {
        let mut inner = self.inner.borrow_mut();
        inner.close.get_or_insert(Close {
            code,
            reason: "",
            by_peer: true,
        });
        wake(&mut inner);
    }

    pub fn hand_off(&self, to: ShardId, handoff: Handoff) {
        let mut inner = self.inner.borrow_mut();
        inner.handoff = Some((to, handoff));
        wake(&mut inner);
    }

    pub fn has_work(&self) -> bool {
        let inner = self.inner.borrow();
        !inner.bytes.is_empty() || inner.close.is_some() || inner.handoff.is_some()
    }

    /// The connection's task waits on this outbox: `waker` runs when work is queued.
    pub fn set_waker(&self, waker: &Waker) {
        self.inner.borrow_mut().waker = Some(waker.clone());
    }

    /// Takes everything queued: the frames' bytes (swapped into `out`, which must be empty),
    /// a close to send, a hand-off to make.
    ///
    /// Until `written`, the outbox writes nothing itself: new frames queue behind these.
    pub fn take_work(&self, out: &mut Vec<u8>) -> (Option<Close>, Option<(ShardId, Handoff)>) {
        let mut inner = self.inner.borrow_mut();
        std::mem::swap(&mut inner.bytes, out);
        inner.writing = !out.is_empty();
        let (close, handoff) = (inner.close.take(), inner.handoff.take());
        if close.is_some() || handoff.is_some() {
            // The socket is closing or moving: nothing more goes straight to it.
            inner.fd = None;
        }
        (close, handoff)
    }

    /// The bytes `take_work` gave are written.
    pub fn written(&self) {
        self.inner.borrow_mut().writing = false;
    }

    /// A hand-off or a close is pending: read no further frames.
    pub fn stop_reading(&self) -> bool {
        let inner = self.inner.borrow();
        inner.handoff.is_some() || inner.close.is_some()
    }
}

/// A close frame to send, and who started the close.
#[derive(Clone, Copy)]
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
    /// The client sent its close frame first; this one answers it.
    pub by_peer: bool,
}

fn wake(inner: &mut OutboxInner) {
    if let Some(waker) = inner.waker.take() {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn frame(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        ws::encode_text(&mut out, text);
        out
    }

    fn read_all(peer: &mut UnixStream) -> Vec<u8> {
        peer.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = peer.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// With nothing queued, a frame goes straight to the socket: no work for the task.
    #[test]
    fn an_idle_connection_gets_its_frame_at_once() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let outbox = Outbox::default();
        let _through = outbox.write_through(ours.as_raw_fd());
        assert!(outbox.push_text("hello"));
        assert!(!outbox.has_work());
        assert_eq!(read_all(&mut peer), frame("hello"));
    }

    /// Frames queue behind bytes the task is writing, and behind what the kernel refused:
    /// the socket sees every frame once, in order.
    #[test]
    fn frames_keep_their_order_behind_a_write_and_a_full_socket() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let outbox = Outbox::default();
        let _through = outbox.write_through(ours.as_raw_fd());
        let mut expected = Vec::new();
        let mut sent = Vec::new();

        // The task is writing a pong: a frame pushed meanwhile waits for it.
        outbox.push_pong(b"p");
        let mut out = Vec::new();
        outbox.take_work(&mut out);
        expected.extend_from_slice(&out);
        outbox.push_text("behind the pong");
        expected.extend(frame("behind the pong"));
        assert!(outbox.has_work(), "queued, not written");
        sent.extend_from_slice(&out); // the task's write
        outbox.written();
        out.clear();
        outbox.take_work(&mut out);
        sent.extend_from_slice(&out);
        outbox.written();
        std::io::Write::write_all(&mut &ours, &sent).unwrap();

        // Frames until the kernel refuses some: the rest queue for the task.
        let big = "x".repeat(60_000);
        for i in 0..64 {
            let text = format!("{i}{big}");
            expected.extend(frame(&text));
            assert!(outbox.push_text(&text));
            if outbox.has_work() {
                break;
            }
        }
        assert!(outbox.has_work(), "the socket filled up");
        let mut got = read_all(&mut peer);
        // The task writes what queued meanwhile; nothing new goes straight past it.
        out.clear();
        outbox.take_work(&mut out);
        outbox.push_text("last");
        expected.extend(frame("last"));
        std::io::Write::write_all(&mut &ours, &out).unwrap();
        outbox.written();
        out.clear();
        outbox.take_work(&mut out);
        std::io::Write::write_all(&mut &ours, &out).unwrap();
        got.extend(read_all(&mut peer));
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "every frame once, in order");
    }

    /// Closing, or the guard gone (the socket closed or moved), nothing is written directly.
    #[test]
    fn nothing_goes_straight_to_a_closing_or_released_socket() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let outbox = Outbox::default();
        {
            let _through = outbox.write_through(ours.as_raw_fd());
            outbox.close(1000, "bye");
            outbox.push_text("after the close");
        }
        assert!(read_all(&mut peer).is_empty());
        let outbox = Outbox::default();
        drop(outbox.write_through(ours.as_raw_fd()));
        outbox.push_text("queued");
        assert!(outbox.has_work());
        assert!(read_all(&mut peer).is_empty());
    }
}
