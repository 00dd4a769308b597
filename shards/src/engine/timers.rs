//! Deadlines: one min-heap of (when, what). The driver asks for the earliest
//! (`Shard::poll_timeout`) and calls `Shard::handle_timeout` once it has passed; only the due
//! entries are popped, so the cost of time is O(log n) per deadline, not a scan of every
//! connection per tick.
//!
//! Entries are never removed early. The handler of a popped entry checks it is still due: a
//! closed connection's entries are skipped, a heartbeat that saw activity since reschedules
//! itself. Each connection has at most one heartbeat and one retry entry live, so the heap
//! holds at most two entries per connection (plus those of connections closed within the last
//! heartbeat interval), plus one per user with an offline notification pending and one per bot
//! HTTP request of the last `BOT_CALL_WAIT_MS` (a no-op if it was answered). In a cluster of
//! several nodes, each gather and each group addition also gets one entry
//! (`CROSS_NODE_WAIT_MS`), a no-op if it completed in time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::ids::{ConnId, ConvId, UserId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    /// Ping the connection if it has been silent, close it if silent too long.
    Heartbeat(ConnId),
    /// Resend the connection's pushes that have waited `push_retry_ms` for their ack.
    Retry(ConnId),
    /// A gather still incomplete now lost a part on another node: answer `unavailable`.
    Gather(u64),
    /// A group addition still waiting for a home shard's `Indexed` (another node's, that
    /// died after taking the mail): finish it, those users listed as `failed`.
    Add(ConvId, u64),
    /// A client request forwarded to another node's shard: answer `unavailable` if it is still
    /// unanswered; once more, a wait later, forget it.
    Reply(ConnId, u64),
    /// The coalescing window of a user's offline notification closed: send it.
    Notify(UserId),
    /// A bot's HTTP request (or its relay) may have waited long enough.
    Relay(ConnId),
}

#[derive(Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(u64, Timer)>>,
}

impl Timers {
    pub(super) fn at(&mut self, when_ms: u64, timer: Timer) {
        self.heap.push(Reverse((when_ms, timer)));
    }

    /// The earliest deadline, if any.
    pub(super) fn next(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((when, _))| *when)
    }

    /// The next entry due at `now_ms`, removed.
    pub(super) fn pop_due(&mut self, now_ms: u64) -> Option<Timer> {
        if self.next()? > now_ms {
            return None;
        }
        self.heap.pop().map(|Reverse((_, timer))| timer)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let mut t = Timers::default();
        t.at(30, Timer::Retry(ConnId(1)));
        t.at(10, Timer::Heartbeat(ConnId(2)));
        t.at(20, Timer::Heartbeat(ConnId(1)));
        assert_eq!(t.next(), Some(10));
        assert_eq!(t.pop_due(9), None);
        assert_eq!(t.pop_due(25), Some(Timer::Heartbeat(ConnId(2))));
        assert_eq!(t.pop_due(25), Some(Timer::Heartbeat(ConnId(1))));
        assert_eq!(t.pop_due(25), None);
        assert_eq!((t.next(), t.len()), (Some(30), 1));
    }
}
