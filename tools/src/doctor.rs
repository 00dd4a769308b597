//! The host doctor: each check reads one setting, compares it with what `tuning.md` recommends
//! for the planned load, and says why it matters. Reads only; changes nothing.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Status {
    Ok,
    Low,
    Unknown,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub current: String,
    pub recommended: String,
    pub status: Status,
    /// The `tuning.md` section that explains it.
    pub section: &'static str,
    pub why: &'static str,
}

/// What the host is being checked for.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub connections: u64,
    pub shards: u64,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn read_u64(path: &str) -> Option<u64> {
    read(path)?.split_whitespace().next()?.parse().ok()
}

fn rlimit(resource: libc::__rlimit_resource_t) -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    (unsafe { libc::getrlimit(resource, &mut lim) } == 0).then_some((lim.rlim_cur, lim.rlim_max))
}

fn at_least(
    name: &'static str,
    current: Option<u64>,
    want: u64,
    section: &'static str,
    why: &'static str,
) -> Check {
    Check {
        name,
        current: current.map_or("unknown".into(), |v| v.to_string()),
        recommended: format!(">= {want}"),
        status: match current {
            Some(v) if v >= want => Status::Ok,
            Some(_) => Status::Low,
            None => Status::Unknown,
        },
        section,
        why,
    }
}

pub fn checks(t: Target) -> Vec<Check> {
    let mut out = Vec::new();
    let fds_wanted = t.connections + 4096;
    let nofile = rlimit(libc::RLIMIT_NOFILE);
    out.push(at_least(
        "open files (ulimit -n)",
        nofile.map(|l| l.0),
        fds_wanted,
        "file-descriptors",
        "one fd per connection, plus RocksDB files (max_open_files 512) and listeners",
    ));
    out.push(at_least(
        "fs.file-max",
        read_u64("/proc/sys/fs/file-max"),
        fds_wanted,
        "file-descriptors",
        "the system-wide cap behind every process's limit",
    ));
    let memlock_wanted = t.shards * 3 * 512 * 1024 + (1 << 20);
    out.push(at_least(
        "locked memory (ulimit -l), bytes",
        rlimit(libc::RLIMIT_MEMLOCK).map(|l| l.0),
        memlock_wanted,
        "locked-memory",
        "glommio registers 3 io_uring rings per shard with locked buffers; below this Hermod shrinks them, then refuses to start",
    ));
    let disabled = read_u64("/proc/sys/kernel/io_uring_disabled");
    out.push(Check {
        name: "io_uring enabled",
        current: match disabled {
            Some(0) | None => "yes".into(),
            Some(v) => format!("kernel.io_uring_disabled = {v}"),
        },
        recommended: "kernel.io_uring_disabled = 0, kernel >= 5.8".into(),
        status: if matches!(disabled, Some(0) | None) {
            Status::Ok
        } else {
            Status::Low
        },
        section: "io-uring",
        why: "every shard's network and timer I/O goes through io_uring (glommio)",
    });
    out.push(Check {
        name: "kernel",
        current: read("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
        recommended: ">= 5.8".into(),
        status: kernel_at_least(5, 8),
        section: "io-uring",
        why: "glommio needs io_uring features from 5.8",
    });
    out.push(at_least(
        "net.core.somaxconn",
        read_u64("/proc/sys/net/core/somaxconn"),
        4096,
        "accept-backlog",
        "caps the accept queue of each shard's listener (Hermod asks for 1024 each via glommio); a reconnect storm overflows a short queue into SYN retries",
    ));
    out.push(at_least(
        "net.ipv4.tcp_max_syn_backlog",
        read_u64("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
        4096,
        "accept-backlog",
        "half-open connections waiting for their handshake during a connect storm",
    ));
    let ports = read("/proc/sys/net/ipv4/ip_local_port_range").and_then(|r| {
        let mut it = r.split_whitespace().filter_map(|x| x.parse::<u64>().ok());
        Some((it.next()?, it.next()?))
    });
    out.push(Check {
        name: "net.ipv4.ip_local_port_range",
        current: ports.map_or("unknown".into(), |(a, b)| format!("{a} {b} ({} ports)", b - a + 1)),
        recommended: ">= 50000 ports (load generators; servers accept, they do not dial)".into(),
        status: match ports {
            Some((a, b)) if b - a + 1 >= 50_000 => Status::Ok,
            Some(_) => Status::Low,
            None => Status::Unknown,
        },
        section: "ports",
        why: "each client connection from one source address takes one local port on the client host",
    });
    let governors: Vec<String> = (0..std::thread::available_parallelism().map_or(1, |n| n.get()))
        .filter_map(|c| {
            read(&format!(
                "/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor"
            ))
        })
        .collect();
    out.push(Check {
        name: "CPU frequency governor",
        current: if governors.is_empty() {
            "no cpufreq (VM or fixed clock)".into()
        } else {
            governors.join(",")
        },
        recommended: "performance".into(),
        status: if governors.is_empty() {
            Status::Unknown
        } else if governors.iter().all(|g| g == "performance") {
            Status::Ok
        } else {
            Status::Low
        },
        section: "cpu",
        why: "a shard core that clocks down between bursts adds wake-up latency to every message",
    });
    let thp = read("/sys/kernel/mm/transparent_hugepage/enabled");
    let thp_mode = thp
        .as_deref()
        .and_then(|s| s.split('[').nth(1))
        .and_then(|s| s.split(']').next())
        .map(str::to_owned);
    out.push(Check {
        name: "transparent huge pages",
        current: thp_mode.clone().unwrap_or_else(|| "unknown".into()),
        recommended: "madvise or never".into(),
        status: match thp_mode.as_deref() {
            Some("madvise" | "never") => Status::Ok,
            Some(_) => Status::Low,
            None => Status::Unknown,
        },
        section: "memory",
        why: "RocksDB advises against THP=always: compaction of huge pages causes latency spikes",
    });
    let irqbalance = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok).any(|e| {
                read(&format!("{}/comm", e.path().display())).as_deref() == Some("irqbalance")
            })
        })
        .unwrap_or(false);
    out.push(Check {
        name: "IRQ balancing",
        current: if irqbalance { "irqbalance running".into() } else { "irqbalance not running".into() },
        recommended: "NIC queues' IRQs on the shard cores, one queue per core (see tuning.md)".into(),
        status: Status::Unknown,
        section: "irq",
        why: "a packet processed on the core of the shard that owns its socket avoids a cross-core hop",
    });
    out.push(Check {
        name: "cores",
        current: std::thread::available_parallelism()
            .map_or("unknown".into(), |n| n.get().to_string()),
        recommended: format!(">= {} (one per shard)", t.shards),
        status: match std::thread::available_parallelism() {
            Ok(n) if n.get() as u64 >= t.shards => Status::Ok,
            Ok(_) => Status::Low,
            Err(_) => Status::Unknown,
        },
        section: "cores",
        why: "each shard is pinned to its own core; two shards on one core take turns",
    });
    out
}

fn kernel_at_least(major: u64, minor: u64) -> Status {
    let Some(release) = read("/proc/sys/kernel/osrelease") else {
        return Status::Unknown;
    };
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u64>().ok());
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) if (a, b) >= (major, minor) => Status::Ok,
        (Some(_), Some(_)) => Status::Low,
        _ => Status::Unknown,
    }
}

pub fn render(checks: &[Check]) -> String {
    let mut out = format!(
        "{:<34} {:<28} {:<34} {:<8} why (tuning.md#section)\n",
        "check", "current", "recommended", "status"
    );
    for c in checks {
        let status = match c.status {
            Status::Ok => "ok",
            Status::Low => "LOW",
            Status::Unknown => "?",
        };
        out.push_str(&format!(
            "{:<34} {:<28} {:<34} {:<8} {} (#{})\n",
            c.name, c.current, c.recommended, status, c.why, c.section
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_reads_something_on_linux() {
        let checks = checks(Target {
            connections: 1000,
            shards: 1,
        });
        assert!(checks.len() >= 10);
        let nofile = checks
            .iter()
            .find(|c| c.name.starts_with("open files"))
            .unwrap();
        assert_ne!(nofile.current, "unknown", "getrlimit works on Linux");
        assert_ne!(nofile.status, Status::Unknown);
        assert!(render(&checks).contains("io_uring enabled"));
    }
}
