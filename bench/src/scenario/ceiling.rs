//! `ceiling`: what this host's kernel allows without Hermod, measured by the same instrument in
//! the same setup, so every Hermod figure can be read as a share of it (issue 14).
//!
//! No server is involved: the "server side" is one thread of this process pinned to
//! `--server-core` (Hermod's shard core in the other runs), and the rest of the process (the
//! load side, pinned by `taskset` as in every run) reads and writes the other ends of the same
//! loopback sockets.
//!
//! - `fanout`: the server thread writes WebSocket text frames of `--frame-bytes` round-robin to
//!   `--conns` open sockets as fast as it can, `--batch` frames per `write(2)` (1: one write per
//!   delivery, as a push to each member of a group costs). The load side reads and counts. The
//!   figure: frames written per second by one core. `group` is compared with it.
//!   With `--rounds-per-s R` it writes instead one frame to every socket R times a second (a
//!   message to a group of N, its readers idle in between, as at a group's usual pace): the
//!   figure is how long one core takes for a round — the floor of the time a message takes to
//!   reach a group's last member, which `group`'s end-to-end latency is compared with.
//! - `echo`: the server thread echoes whatever it reads on `--conns` sockets (a tokio
//!   current-thread loop: read, then write back); the load side keeps `--window` frames in
//!   flight per connection, closed loop. The figure: round trips per second by one core, and
//!   their latency. Hermod's `echo` (and `direct`, two round trips and a commit per message)
//!   is compared with it.
//!
//! The server thread's CPU time over the measured window comes from `/proc`, so a ceiling that
//! did not saturate its core says so.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::report::Report;
use crate::stats::{histogram, record, Summary};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CeilingMode {
    Fanout,
    Echo,
}

/// The ceiling's parameters, which are also its command-line options.
#[derive(Clone, Debug, Serialize, clap::Args)]
pub struct CeilingParams {
    #[arg(long, value_enum)]
    pub mode: CeilingMode,
    /// Connections (loopback socket pairs, both ends in this process).
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Payload bytes of each WebSocket frame (a push of a short message is ~200).
    #[arg(long, default_value_t = 200)]
    pub frame_bytes: usize,
    /// fanout: frames per write(2) to one socket.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// echo: frames in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// fanout: one frame to every socket this many times a second (a message to a group of
    /// --conns at that pace), reporting how long each round takes; default flat out.
    #[arg(long)]
    pub rounds_per_s: Option<f64>,
    /// Seconds before measuring.
    #[arg(long = "warmup", default_value_t = 1.0)]
    pub warmup_s: f64,
    /// Measured seconds.
    #[arg(long = "duration", default_value_t = 5.0)]
    pub duration_s: f64,
    /// The core the server thread pins itself to.
    #[arg(long, default_value_t = 0)]
    pub server_core: usize,
}

pub async fn ceiling(p: CeilingParams) -> anyhow::Result<Report> {
    anyhow::ensure!(p.conns >= 1, "conns must be positive");
    anyhow::ensure!(
        p.batch >= 1 && p.window >= 1,
        "batch and window must be positive"
    );
    anyhow::ensure!(
        (1..=65_535).contains(&p.frame_bytes),
        "frame bytes must be 1-65535"
    );
    let (clients, servers) = socket_pairs(p.conns).await?;
    let frame = ws_frame(p.frame_bytes);
    match p.mode {
        CeilingMode::Fanout => fanout(&p, clients, servers, frame).await,
        CeilingMode::Echo => echo(&p, clients, servers, frame).await,
    }
}

/// `n` connected loopback pairs: (the load side's tokio streams, the server side's std ones).
async fn socket_pairs(n: usize) -> anyhow::Result<(Vec<tokio::net::TcpStream>, Vec<TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let accept = std::thread::spawn(move || -> std::io::Result<Vec<TcpStream>> {
        (0..n).map(|_| listener.accept().map(|(s, _)| s)).collect()
    });
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .context("connecting (is RLIMIT_NOFILE high enough?)")?;
        stream.set_nodelay(true)?;
        clients.push(stream);
    }
    let servers = accept
        .join()
        .map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
    for s in &servers {
        s.set_nodelay(true)?;
    }
    Ok((clients, servers))
}

/// An unmasked (server-to-client) WebSocket text frame with `len` payload bytes.
fn ws_frame(len: usize) -> Vec<u8> {
    let mut frame = vec![0x81];
    if len < 126 {
        frame.push(len as u8);
    } else {
        frame.push(126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    }
    frame.resize(frame.len() + len, b'x');
    frame
}

/// The server thread: pinned, its tid published for CPU sampling; `T` is what it returns.
struct ServerThread<T> {
    tid: Arc<AtomicI32>,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<anyhow::Result<T>>,
}

impl<T: Send + 'static> ServerThread<T> {
    fn spawn(
        core: usize,
        body: impl FnOnce(&AtomicBool) -> anyhow::Result<T> + Send + 'static,
    ) -> ServerThread<T> {
        let tid = Arc::new(AtomicI32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tid.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            pin_to(core)?;
            // SAFETY: gettid has no preconditions.
            t.store(unsafe { libc::gettid() }, Ordering::Relaxed);
            body(&s)
        });
        ServerThread { tid, stop, handle }
    }

    /// The thread's user + system CPU time so far.
    fn cpu(&self) -> Duration {
        let tid = self.tid.load(Ordering::Relaxed);
        thread_cpu(tid).unwrap_or_default()
    }

    fn finish(self) -> anyhow::Result<T> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))?
    }
}

fn pin_to(core: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it for any core
    // below CPU_SETSIZE, checked first.
    unsafe {
        anyhow::ensure!(core < libc::CPU_SETSIZE as usize, "no core {core}");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            anyhow::bail!(
                "pinning to core {core}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// utime + stime of thread `tid` of this process, from /proc (clock ticks of 10 ms).
fn thread_cpu(tid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// The measured window: after the warm-up, for the duration.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn new(p: &CeilingParams) -> Window {
        let start = Instant::now() + Duration::from_secs_f64(p.warmup_s);
        Window {
            start,
            end: start + Duration::from_secs_f64(p.duration_s),
        }
    }
}

async fn fanout(
    p: &CeilingParams,
    clients: Vec<tokio::net::TcpStream>,
    servers: Vec<TcpStream>,
    frame: Vec<u8>,
) -> anyhow::Result<Report> {
    let read = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let blocked = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for mut c in clients {
        let read = read.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = c.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                read.fetch_add(n as u64, Ordering::Relaxed);
            }
        }));
    }
    let chunk = frame.repeat(p.batch);
    let (w, wb, b) = (writes.clone(), written.clone(), blocked.clone());
    let (pace, window) = (p.rounds_per_s, Window::new(p));
    // Returns how long each paced round in the window took.
    let server = ServerThread::spawn(p.server_core, move |stop| {
        let mut rounds = histogram();
        let mut servers = servers;
        for s in &servers {
            s.set_nonblocking(true)?;
        }
        let period = pace.map(|r| Duration::from_secs_f64(1.0 / r));
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let round = Instant::now();
            for s in &mut servers {
                // A partial write leaves a frame cut; the reader counts bytes, so the
                // figure holds (frames = bytes / frame size).
                match s.write(&chunk) {
                    Ok(n) => {
                        w.fetch_add(1, Ordering::Relaxed);
                        wb.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        b.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some(period) = period {
                if round >= window.start && round < window.end {
                    record(&mut rounds, round.elapsed());
                }
                next += period;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        }
        Ok(rounds)
    });
    let counters = || {
        (
            read.load(Ordering::Relaxed),
            written.load(Ordering::Relaxed),
            writes.load(Ordering::Relaxed),
            blocked.load(Ordering::Relaxed),
            server.cpu(),
        )
    };
    tokio::time::sleep_until(window.start.into()).await;
    let (read0, written0, writes0, blocked0, cpu0) = counters();
    tokio::time::sleep_until(window.end.into()).await;
    let (read1, written1, writes1, blocked1, cpu1) = counters();
    let rounds = server.finish()?;
    for r in readers {
        r.abort();
    }
    let secs = p.duration_s;
    let frames = |bytes: u64| bytes as f64 / frame.len() as f64 / secs;
    let round = Summary::of(&rounds);
    // Written is exact for the window; read lags it by what sits in socket buffers at each
    // end of the window (up to a few MB over thousands of sockets), so it is shown beside.
    let figures = json!({
        "frames_written_per_s": frames(written1 - written0),
        "frames_read_per_s": frames(read1 - read0),
        "writes_per_s": (writes1 - writes0) as f64 / secs,
        "writes_refused_full_per_s": (blocked1 - blocked0) as f64 / secs,
        "bytes_per_s": (read1 - read0) as f64 / secs,
        "server_core_busy": (cpu1 - cpu0).as_secs_f64() / secs,
        "frame_wire_bytes": frame.len(),
        "round_us_per_frame": round.mean_us / p.conns as f64,
        "round": round,
    });
    Report::new("ceiling-fanout", p, figures, &[("round", &rounds)])
}

async fn echo(
    p: &CeilingParams,
    clients: Vec<tokio::net::TcpStream>,
    servers: Vec<TcpStream>,
    frame: Vec<u8>,
) -> anyhow::Result<Report> {
    let server = ServerThread::spawn(p.server_core, move |stop| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            for s in servers {
                s.set_nonblocking(true)?;
                let mut s = tokio::net::TcpStream::from_std(s)?;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(())
        })
    });
    let window = Window::new(p);
    let frame = Arc::new(frame);
    let mut tasks = Vec::new();
    for mut c in clients {
        let (frame, window_n) = (frame.clone(), p.window);
        let (start, end) = (window.start, window.end);
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut sent_at = VecDeque::with_capacity(window_n);
            let mut buf = vec![0u8; 64 * 1024];
            let (mut pending, mut done) = (0usize, 0u64);
            for _ in 0..window_n {
                c.write_all(&frame).await?;
                sent_at.push_back(Instant::now());
            }
            while Instant::now() < end {
                let n = match tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf))
                    .await
                {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => continue,
                };
                pending += n;
                let now = Instant::now();
                let mut answered = 0;
                while pending >= frame.len() {
                    pending -= frame.len();
                    answered += 1;
                    if let Some(at) = sent_at.pop_front() {
                        if at >= start && at < end {
                            record(&mut h, now - at);
                            done += 1;
                        }
                    }
                }
                if answered > 0 {
                    let more = frame.repeat(answered);
                    c.write_all(&more).await?;
                    let now = Instant::now();
                    sent_at.extend(std::iter::repeat_n(now, answered));
                }
            }
            Ok::<_, anyhow::Error>((h, done))
        }));
    }
    tokio::time::sleep_until(window.start.into()).await;
    let cpu0 = server.cpu();
    tokio::time::sleep_until(window.end.into()).await;
    let cpu1 = server.cpu();
    let mut all = histogram();
    let mut done = 0;
    for t in tasks {
        let (h, d) = t.await.context("connection task")??;
        all.add(&h).expect("same bounds");
        done += d;
    }
    server.finish()?;
    let secs = p.duration_s;
    let figures = json!({
        "round_trips_per_s": done as f64 / secs,
        "latency": Summary::of(&all),
        "server_core_busy": (cpu1 - cpu0).as_secs_f64() / secs,
        "frame_wire_bytes": frame.len(),
    });
    Report::new("ceiling-echo", p, figures, &[("latency", &all)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_websocket_headers() {
        assert_eq!(&ws_frame(3)[..], &[0x81, 3, b'x', b'x', b'x']);
        let f = ws_frame(300);
        assert_eq!((f[1], u16::from_be_bytes([f[2], f[3]])), (126, 300));
        assert_eq!(f.len(), 304);
    }

    #[test]
    fn this_thread_has_cpu_time() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        assert!(thread_cpu(tid).is_some_and(|t| t > Duration::ZERO));
    }
}
