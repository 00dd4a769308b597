//! A connection's outbox: the frames the engine queued for it and what it decided about it (a
//! close, a hand-off), shared between the driver's `dispatch` (which fills it) and the
//! connection's task (which drains it to the socket). A leaf.
//!
//! Policy: at most `OUTBOX_BYTES_MAX` bytes queued; a push beyond it closes the connection
//! (4001, slow consumer) — the device loses nothing, it syncs on reconnect. A best-effort push
//! (`offer_text`) is dropped instead once `OFFER_BYTES_MAX` bytes are queued, and the
//! connection stays.

use std::cell::RefCell;
use std::task::Waker;

use hermod_shards::engine::Handoff;
use hermod_shards::limits::{OFFER_BYTES_MAX, OUTBOX_BYTES_MAX};
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
}

impl Outbox {
    /// Queues a text frame; false (and the connection is being closed) if the outbox is full.
    pub fn push_text(&self, text: &str) -> bool {
        let mut inner = self.inner.borrow_mut();
        if inner.close.is_some() {
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

    /// Queues a best-effort text frame if at most `OFFER_BYTES_MAX` bytes are queued already;
    /// false (and nothing else happens) if not.
    pub fn offer_text(&self, text: &str) -> bool {
        let mut inner = self.inner.borrow_mut();
        if inner.close.is_some() {
            return true;
        }
        if inner.bytes.len() > OFFER_BYTES_MAX {
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
    pub fn take_work(&self, out: &mut Vec<u8>) -> (Option<Close>, Option<(ShardId, Handoff)>) {
        let mut inner = self.inner.borrow_mut();
        std::mem::swap(&mut inner.bytes, out);
        (inner.close.take(), inner.handoff.take())
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
