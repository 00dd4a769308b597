//! Latency histograms and correctness counters.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microsecond latencies from 1 µs to 100 s at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, latency: Duration) {
    // Saturates at the top bound rather than dropping the sample: a 100 s stall is a figure.
    h.saturating_record((latency.as_micros() as u64).max(1));
}

/// Percentiles of a histogram, in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Every message followed from send to delivery.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Correctness {
    pub sent: u64,
    pub acked: u64,
    /// Sends answered with an error (e.g. rate_limited) or never answered.
    pub unacked: u64,
    pub delivered: u64,
    /// Acked but never delivered to the recipient.
    pub lost: u64,
    /// Delivered twice as a new push (a retry repeats an earlier seq: not a duplicate).
    pub duplicated: u64,
    /// First deliveries on one connection that went back in seq within a conversation.
    pub reordered: u64,
}

impl Correctness {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0
    }
}
