//! The JSON report (`--report FILE`) and `compare`.
//!
//! Schema `hermod-bench/1`:
//! ```text
//! { "schema": "hermod-bench/1", "scenario": "direct", "started_at_unix_s": 1732350000,
//!   "params": { ...the scenario's parameters... },
//!   "host": { "cores": 2, "kernel": "6.1.0", "hostname": "...", "nofile_limit": 20000 },
//!   "figures": { "throughput_per_s": 19870.5, "ack_latency": Summary, "e2e_latency": Summary,
//!                "correctness": Correctness, ... },
//!   "histograms": { "e2e_latency": "<base64 hdrhistogram V2>", ... } }
//! ```
//! Figures are flat numbers or `Summary`/`Correctness` objects; `compare` walks both reports'
//! figures and prints every numeric leaf with its delta.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hdrhistogram::serialization::{Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const SCHEMA: &str = "hermod-bench/1";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub scenario: String,
    pub started_at_unix_s: u64,
    pub params: Value,
    pub host: Host,
    pub figures: Value,
    pub histograms: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Host {
    pub cores: usize,
    pub kernel: String,
    pub hostname: String,
    /// The load generator's RLIMIT_NOFILE (soft) during the run: its ceiling on connections.
    #[serde(default)]
    pub nofile_limit: u64,
}

impl Report {
    /// A report of this host, now, with each histogram encoded.
    pub fn new<P: Serialize>(
        scenario: &str,
        params: &P,
        figures: Value,
        histograms: &[(&str, &Histogram<u64>)],
    ) -> anyhow::Result<Report> {
        let started_at_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Report {
            schema: SCHEMA.into(),
            scenario: scenario.into(),
            started_at_unix_s,
            params: serde_json::to_value(params)?,
            host: Host::this(),
            figures,
            histograms: histograms
                .iter()
                .map(|(name, h)| (name.to_string(), encode_histogram(h)))
                .collect(),
        })
    }
}

impl Host {
    pub fn this() -> Host {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        Host {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease"),
            hostname: read("/proc/sys/kernel/hostname"),
            nofile_limit: crate::conn::nofile_limit().0,
        }
    }
}

pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .expect("serialising into memory cannot fail");
    STANDARD.encode(bytes)
}

/// Flattens numeric leaves of the figures: `e2e_latency.p99_us` → 1234.
fn leaves(prefix: &str, v: &Value, out: &mut BTreeMap<String, f64>) {
    match v {
        Value::Number(n) => {
            out.insert(prefix.to_owned(), n.as_f64().unwrap_or(0.0));
        }
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&key, v, out);
            }
        }
        _ => {}
    }
}

/// A table of every figure in `a` and `b` with the change from a to b.
pub fn compare(a: &Report, b: &Report) -> String {
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    leaves("", &a.figures, &mut fa);
    leaves("", &b.figures, &mut fb);
    let mut out = format!("{:<36} {:>14} {:>14} {:>9}\n", "figure", "A", "B", "change");
    if a.scenario != b.scenario {
        out.insert_str(
            0,
            &format!(
                "warning: comparing scenario {} with {}\n",
                a.scenario, b.scenario
            ),
        );
    }
    let keys: std::collections::BTreeSet<_> = fa.keys().chain(fb.keys()).collect();
    for key in keys {
        let (x, y) = (fa.get(key), fb.get(key));
        let change = match (x, y) {
            (Some(x), Some(y)) if *x != 0.0 => format!("{:+.1}%", (y - x) / x * 100.0),
            (Some(_), Some(_)) => "".into(),
            _ => "n/a".into(),
        };
        let show = |v: Option<&f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        out.push_str(&format!(
            "{:<36} {:>14} {:>14} {:>9}\n",
            key,
            show(x),
            show(y),
            change
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(figures: Value) -> Report {
        Report {
            schema: SCHEMA.into(),
            scenario: "direct".into(),
            started_at_unix_s: 0,
            params: json!({}),
            host: Host::this(),
            figures,
            histograms: BTreeMap::new(),
        }
    }

    #[test]
    fn compare_prints_deltas_of_nested_figures() {
        let a = report(json!({ "throughput_per_s": 100.0, "e2e_latency": { "p99_us": 200 } }));
        let b = report(json!({ "throughput_per_s": 150.0, "e2e_latency": { "p99_us": 100 } }));
        let table = compare(&a, &b);
        assert!(
            table.contains("throughput_per_s") && table.contains("+50.0%"),
            "{table}"
        );
        assert!(
            table.contains("e2e_latency.p99_us") && table.contains("-50.0%"),
            "{table}"
        );
    }

    #[test]
    fn histograms_round_trip_through_base64() {
        let mut h = crate::stats::histogram();
        h.record(1234).unwrap();
        let text = encode_histogram(&h);
        let bytes = STANDARD.decode(text).unwrap();
        let back: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .unwrap();
        assert_eq!(back.len(), 1);
    }
}
