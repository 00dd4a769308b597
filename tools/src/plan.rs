//! The capacity planner. Every output line shows its arithmetic, so a reader can check it and
//! change one input in their head. Per-core throughput comes from a `hermod-bench direct`
//! report when given (`--report`), so the plan rests on a measurement, not a guess.

use serde::Serialize;

/// The load to plan for, and what one core and one host can do.
#[derive(Clone, Debug, Serialize)]
pub struct Inputs {
    pub dau: f64,
    pub msgs_per_user_day: f64,
    /// Peak-hour rate over the daily average.
    pub peak_factor: f64,
    /// Share of daily users online at the peak.
    pub online_ratio: f64,
    pub devices_per_user: f64,
    /// Average recipients per message (1 for one-to-one; the group size for groups).
    pub recipients_per_msg: f64,
    pub retention_days: f64,
    /// Stored bytes per message: record + dedup key + RocksDB overhead.
    pub stored_bytes_per_msg: f64,
    /// Bytes on the wire per message for the sender (frame + ack) and per push (frame + ack).
    pub wire_bytes_per_send: f64,
    pub wire_bytes_per_push: f64,
    /// Messages per second one core sustains within the latency budget (from a bench report).
    pub per_core_msgs: f64,
    /// Fraction of a core to plan to use at peak.
    pub headroom: f64,
    /// Server memory per connected device (measured: docs/benchmarks.md).
    pub bytes_per_conn: f64,
    pub cores_per_host: f64,
    pub mem_gib_per_host: f64,
    /// Connections one host may hold (file descriptors, with room for RocksDB and listeners).
    pub conns_per_host: f64,
    /// Server CPU (Hermod and nats-server) per mail that crosses nodes, above the same mail
    /// between two shards of one node, in µs (`scripts/bench-cluster.sh`, docs/benchmarks.md).
    pub link_us_per_mail: f64,
    /// Mails crossing nodes per message whose two members live on different nodes (measured
    /// 2.0: the append or the fan-out, the ack, the sender's cursor).
    pub cross_mails_per_msg: f64,
    /// Share of messages whose members live on different nodes; `None`: what uniform placement
    /// gives over the planned hosts, (hosts − 1) / hosts.
    pub cross_node_share: Option<f64>,
    /// Share of messages that carry a medium (docs/media.md), and a medium's average size in
    /// bytes. Each recipient's device reads it once.
    pub media_share: f64,
    pub media_bytes: f64,
}

impl Default for Inputs {
    fn default() -> Self {
        Inputs {
            dau: 1e6,
            msgs_per_user_day: 20.0,
            peak_factor: 5.0,
            online_ratio: 0.1,
            devices_per_user: 1.5,
            recipients_per_msg: 1.0,
            retention_days: 30.0,
            stored_bytes_per_msg: 300.0,
            wire_bytes_per_send: 350.0,
            wire_bytes_per_push: 350.0,
            per_core_msgs: 20_000.0,
            headroom: 0.5,
            // hermod-bench idle measured 2.8 KB per authenticated connection (docs/benchmarks.md);
            // the planner keeps a margin for busier connections' buffers.
            bytes_per_conn: 3_300.0,
            cores_per_host: 32.0,
            mem_gib_per_host: 128.0,
            conns_per_host: 1_000_000.0,
            link_us_per_mail: 1.8,
            cross_mails_per_msg: 2.0,
            cross_node_share: None,
            media_share: 0.0,
            media_bytes: 500_000.0,
        }
    }
}

/// One line of the plan: what, how much, and how it was computed.
#[derive(Clone, Debug, Serialize)]
pub struct Line {
    pub what: &'static str,
    pub value: f64,
    pub unit: &'static str,
    pub arithmetic: String,
}

fn line(what: &'static str, value: f64, unit: &'static str, arithmetic: String) -> Line {
    Line {
        what,
        value,
        unit,
        arithmetic,
    }
}

/// Human-sized numbers: 23148 → "23.1k".
pub fn si(v: f64) -> String {
    let a = v.abs();
    if a >= 1e12 {
        format!("{:.1}T", v / 1e12)
    } else if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}

pub fn plan(i: &Inputs) -> Vec<Line> {
    let msgs_day = i.dau * i.msgs_per_user_day;
    let avg = msgs_day / 86_400.0;
    let peak = avg * i.peak_factor;
    let pushes = peak * i.recipients_per_msg * i.devices_per_user * i.online_ratio.max(0.0);
    let conns = i.dau * i.online_ratio * i.devices_per_user;
    let mem_gib = conns * i.bytes_per_conn / 1024f64.powi(3);
    let hosts_mem = (mem_gib / i.mem_gib_per_host).ceil();
    let hosts_conn = (conns / i.conns_per_host).ceil();
    // More hosts make more messages cross nodes, which costs CPU, which may need more hosts:
    // iterate to the fixed point (the host count only grows, so this ends).
    let mut hosts = hosts_mem.max(hosts_conn).max(1.0);
    let (mut share, mut per_core, mut cores, mut hosts_cpu);
    loop {
        share = i
            .cross_node_share
            .unwrap_or((hosts - 1.0) / hosts)
            .clamp(0.0, 1.0);
        per_core = per_core_across(i, share);
        cores = peak / (per_core * i.headroom);
        hosts_cpu = (cores / i.cores_per_host).ceil();
        let need = hosts_cpu.max(hosts_mem).max(hosts_conn).max(1.0);
        if need <= hosts {
            break;
        }
        hosts = need;
    }
    let disk_day = msgs_day * i.stored_bytes_per_msg;
    let disk_total = disk_day * i.retention_days;
    let net_bits = (peak * i.wire_bytes_per_send + pushes * i.wire_bytes_per_push) * 8.0;
    let media_day = msgs_day * i.media_share;
    let media_disk_day = media_day * i.media_bytes;
    let media_in_bits = peak * i.media_share * i.media_bytes * 8.0;
    let reads = i.recipients_per_msg * i.devices_per_user;
    let media_out_bits = media_in_bits * reads;
    vec![
        line("messages per day", msgs_day, "msg", format!("{} DAU × {} msg/user/day", si(i.dau), i.msgs_per_user_day)),
        line("average rate", avg, "msg/s", format!("{} msg/day ÷ 86,400 s", si(msgs_day))),
        line("peak rate", peak, "msg/s", format!("{} msg/s × peak factor {}", si(avg), i.peak_factor)),
        line(
            "peak pushes",
            pushes,
            "push/s",
            format!(
                "{} msg/s × {} recipients × {} devices × {} online",
                si(peak),
                i.recipients_per_msg,
                i.devices_per_user,
                i.online_ratio
            ),
        ),
        line(
            "connections at peak",
            conns,
            "conn",
            format!("{} DAU × {} online × {} devices", si(i.dau), i.online_ratio, i.devices_per_user),
        ),
        line(
            "cross-node share",
            share,
            "",
            match i.cross_node_share {
                Some(_) => "given (--cross-node-share)".to_owned(),
                None => format!("uniform placement over {hosts} hosts: ({hosts} − 1) / {hosts}"),
            },
        ),
        line(
            "per-core rate",
            per_core,
            "msg/s",
            format!(
                "1 ÷ (1/{} msg/s + {share:.2} × {} mails/msg × {} µs/mail)",
                si(i.per_core_msgs),
                i.cross_mails_per_msg,
                i.link_us_per_mail
            ),
        ),
        line(
            "cores",
            cores.ceil(),
            "core",
            format!("{} msg/s ÷ ({} msg/s/core × {} headroom)", si(peak), si(per_core), i.headroom),
        ),
        line(
            "connection memory",
            mem_gib,
            "GiB",
            format!("{} conn × {} B/conn", si(conns), i.bytes_per_conn),
        ),
        line(
            "hosts",
            hosts,
            "host",
            format!(
                "max(cpu {hosts_cpu} = ⌈{:.0}/{}⌉, memory {hosts_mem} = ⌈{mem_gib:.1}/{}⌉, conns {hosts_conn} = ⌈{}/{}⌉)",
                cores.ceil(),
                i.cores_per_host,
                i.mem_gib_per_host,
                si(conns),
                si(i.conns_per_host)
            ),
        ),
        line(
            "disk per day",
            disk_day / 1e9,
            "GB",
            format!("{} msg/day × {} B/msg", si(msgs_day), i.stored_bytes_per_msg),
        ),
        line(
            "disk for retention",
            disk_total / 1e12,
            "TB",
            format!("{:.1} GB/day × {} days", disk_day / 1e9, i.retention_days),
        ),
        line(
            "media per day",
            media_day,
            "media",
            format!("{} msg/day × {} with media", si(msgs_day), i.media_share),
        ),
        line(
            "media disk per day",
            media_disk_day / 1e9,
            "GB",
            format!("{} media/day × {} B (before deduplication)", si(media_day), si(i.media_bytes)),
        ),
        line(
            "media disk, retention",
            media_disk_day * i.retention_days / 1e12,
            "TB",
            format!("{:.1} GB/day × {} days", media_disk_day / 1e9, i.retention_days),
        ),
        line(
            "media upload at peak",
            media_in_bits / 1e9,
            "Gbit/s",
            format!("{} msg/s × {} × {} B × 8", si(peak), i.media_share, si(i.media_bytes)),
        ),
        line(
            "media download at peak",
            media_out_bits / 1e9,
            "Gbit/s",
            format!(
                "{:.2} Gbit/s up × {} recipients × {} devices",
                media_in_bits / 1e9,
                i.recipients_per_msg,
                i.devices_per_user
            ),
        ),
        line(
            "network at peak",
            net_bits / 1e9,
            "Gbit/s",
            format!(
                "({} msg/s × {} B + {} push/s × {} B) × 8",
                si(peak),
                i.wire_bytes_per_send,
                si(pushes),
                i.wire_bytes_per_push
            ),
        ),
    ]
}

/// One core's message rate when `share` of messages cross nodes: its single-node rate, slowed
/// by the links' CPU for the mails that cross.
pub fn per_core_across(i: &Inputs, share: f64) -> f64 {
    let us = 1e6 / i.per_core_msgs + share * i.cross_mails_per_msg * i.link_us_per_mail;
    1e6 / us
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example() {
        // docs: 100M DAU × 20 msgs/day ≈ 23k msg/s average, ~116k at a peak factor of 5.
        let i = Inputs {
            dau: 100e6,
            msgs_per_user_day: 20.0,
            ..Inputs::default()
        };
        let p = plan(&i);
        let get = |what| p.iter().find(|l| l.what == what).unwrap().value;
        assert!((get("average rate") - 23_148.1).abs() < 1.0);
        assert!((get("peak rate") - 115_740.7).abs() < 1.0);
        // 15 hosts (by connections): 14/15 of messages cross nodes, 2 mails × 1.8 µs each.
        assert!((get("per-core rate") - 18_740.6).abs() < 1.0);
        assert_eq!(get("cores"), 13.0, "115.7k / (18.7k × 0.5) = 12.4 → 13");
        assert_eq!(get("connections at peak"), 15e6);
        assert!(get("hosts") >= 1.0);
        assert!(
            (get("disk per day") - 600.0).abs() < 1e-6,
            "2G msg × 300 B = 600 GB"
        );
    }

    #[test]
    fn crossing_nodes_costs_per_core_rate_and_can_add_hosts() {
        let one = Inputs {
            cross_node_share: Some(0.0),
            ..Inputs::default()
        };
        assert_eq!(per_core_across(&one, 0.0), one.per_core_msgs);
        // 20k msg/s/core is 50 µs/msg; all crossing adds 2 × 1.8 µs: 1e6 / 53.6 µs.
        let all = per_core_across(&one, 1.0);
        assert!((all - 1e6 / 53.6).abs() < 1e-6, "{all}");
        // Uniform placement over the hosts the plan itself finds.
        let big = Inputs {
            dau: 1e9,
            ..Inputs::default()
        };
        let p = plan(&big);
        let get = |what| p.iter().find(|l| l.what == what).unwrap().value;
        let hosts = get("hosts");
        assert!(hosts > 1.0);
        assert!((get("cross-node share") - (hosts - 1.0) / hosts).abs() < 1e-9);
        assert!(get("per-core rate") < big.per_core_msgs);
    }

    #[test]
    fn media_storage_and_bandwidth() {
        // 1M DAU × 20 msg/day, 10% with a 500 kB medium: 2M media/day, 1 TB/day.
        let i = Inputs {
            media_share: 0.1,
            ..Inputs::default()
        };
        let p = plan(&i);
        let get = |what| p.iter().find(|l| l.what == what).unwrap().value;
        assert!((get("media per day") - 2e6).abs() < 1e-6);
        assert!((get("media disk per day") - 1_000.0).abs() < 1e-6);
        assert!((get("media disk, retention") - 30.0).abs() < 1e-9);
        // Peak 1,157 msg/s × 0.1 × 500 kB × 8 = 0.463 Gbit/s up; × 1 × 1.5 down.
        let up = get("media upload at peak");
        assert!(
            (up - 1_157.407 * 0.1 * 500_000.0 * 8.0 / 1e9).abs() < 1e-3,
            "{up}"
        );
        assert!((get("media download at peak") - up * 1.5).abs() < 1e-9);
    }

    #[test]
    fn human_numbers() {
        assert_eq!(si(23_148.0), "23.1k");
        assert_eq!(si(1.5e6), "1.5M");
        assert_eq!(si(12.0), "12.0");
    }
}
