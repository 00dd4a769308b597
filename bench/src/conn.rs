//! One benchmark connection, split into a writer half (owned by the scenario's send loop)
//! and a reader half (a task that sorts replies and pushes).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Serialize, Serializer};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Writer = SplitSink<Ws, Message>;
pub type Reader = SplitStream<Ws>;

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the benchmark connects, and from which local addresses.
///
/// One source address gives at most one connection per local port (~28k with Linux's default
/// `ip_local_port_range`), so runs past that spread connections round-robin over several
/// loopback sources (`--sources 127.0.0.1-127.0.0.8`): every 127.0.0.0/8 address is local on
/// Linux. Sockets are bound with `IP_BIND_ADDRESS_NO_PORT`, which defers the port choice to
/// `connect` so ports are shared across destinations as in the kernel's normal path.
/// Cloning is cheap; clones share the round-robin position.
#[derive(Clone)]
pub struct Target {
    inner: Arc<TargetInner>,
}

struct TargetInner {
    /// As given: one URL, or several comma-separated (the nodes of a cluster).
    url: String,
    /// Each node's URL and the `HOST:PORT` taken from it.
    nodes: Vec<(String, String)>,
    sources: Vec<IpAddr>,
    next: AtomicUsize,
    next_node: AtomicUsize,
}

impl Target {
    /// `url` is one `ws://HOST:PORT/...` URL or several, comma-separated: connections then go
    /// to them in turn (a cluster's nodes; a user living on another node is `moved` there).
    pub fn new(url: &str, sources: Vec<IpAddr>) -> anyhow::Result<Target> {
        let mut nodes = Vec::new();
        for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let addr = one
                .strip_prefix("ws://")
                .and_then(|rest| rest.split('/').next())
                .filter(|a| !a.is_empty())
                .with_context(|| format!("{one}: only ws://HOST:PORT/... URLs are supported"))?
                .to_owned();
            nodes.push((one.to_owned(), addr));
        }
        anyhow::ensure!(!nodes.is_empty(), "no URL given");
        Ok(Target {
            inner: Arc::new(TargetInner {
                url: url.to_owned(),
                nodes,
                sources,
                next: AtomicUsize::new(0),
                next_node: AtomicUsize::new(0),
            }),
        })
    }

    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The same sources aimed at another node of a cluster (a `moved` error's `url`).
    pub fn redirect(&self, url: &str) -> anyhow::Result<Target> {
        Target::new(url, self.inner.sources.clone())
    }

    /// Opens a TCP connection to the next node (in turn), from the next source address (or
    /// the kernel's choice). Returns the stream and that node's URL.
    pub(crate) async fn dial(&self) -> anyhow::Result<(TcpStream, &str)> {
        let nodes = &self.inner.nodes;
        let (url, addr) =
            &nodes[self.inner.next_node.fetch_add(1, Ordering::Relaxed) % nodes.len()];
        let sources = &self.inner.sources;
        if sources.is_empty() {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| explain(e, addr, None))?;
            return Ok((stream, url));
        }
        let source = sources[self.inner.next.fetch_add(1, Ordering::Relaxed) % sources.len()];
        let dest: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .with_context(|| format!("resolving {addr}"))?
            .find(|d| d.is_ipv4() == source.is_ipv4())
            .with_context(|| format!("{addr} has no address of the same family as {source}"))?;
        let socket = if source.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| explain(e, addr, Some(source)))?;
        if source.is_ipv4() {
            set_bind_address_no_port(&socket)?;
        }
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| explain(e, addr, Some(source)))?;
        let stream = socket
            .connect(dest)
            .await
            .map_err(|e| explain(e, addr, Some(source)))?;
        Ok((stream, url))
    }
}

impl Serialize for Target {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Target", 2)?;
        st.serialize_field("url", &self.inner.url)?;
        st.serialize_field("sources", &self.inner.sources)?;
        st.end()
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.inner.url)
            .field("sources", &self.inner.sources)
            .finish()
    }
}

/// Parses `--sources`: comma-separated addresses or IPv4 ranges (`127.0.0.1-127.0.0.8`).
pub fn parse_sources(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: Ipv4Addr = a.parse().with_context(|| format!("bad address {a:?}"))?;
                let b: Ipv4Addr = b.parse().with_context(|| format!("bad address {b:?}"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                anyhow::ensure!(a <= b && b - a < 65_536, "bad range {part:?}");
                out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
            }
            None => out.push(
                part.parse()
                    .with_context(|| format!("bad address {part:?}"))?,
            ),
        }
    }
    anyhow::ensure!(!out.is_empty(), "--sources names no address");
    Ok(out)
}

/// `IP_BIND_ADDRESS_NO_PORT`: without it `bind(ip, 0)` reserves a port for all destinations,
/// which caps each source at the size of the ephemeral range even across servers.
fn set_bind_address_no_port(socket: &TcpSocket) -> anyhow::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
    }
    Ok(())
}

/// Names the host limit a failed connect ran into, so a run that hits one says which.
fn explain(e: std::io::Error, addr: &str, source: Option<IpAddr>) -> anyhow::Error {
    let from = source.map_or(String::new(), |s| format!(" from {s}"));
    let hint = match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => {
            let (soft, hard) = nofile_limit();
            format!(
                ": hit the file-descriptor limit (RLIMIT_NOFILE soft {soft}, hard {hard}; \
                 one fd per connection; see tuning.md)"
            )
        }
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => {
            ": out of local ports for this source address (spread over more with \
             --sources 127.0.0.1-127.0.0.N; see tuning.md)"
                .to_owned()
        }
        _ => String::new(),
    };
    anyhow::Error::new(e).context(format!("connecting to {addr}{from}{hint}"))
}

/// This process's RLIMIT_NOFILE (soft, hard).
pub fn nofile_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (0, 0);
    }
    (lim.rlim_cur, lim.rlim_max) // rlim_t is u64 on Linux
}

/// Raises the soft RLIMIT_NOFILE to the hard one (a load generator wants every fd it may have).
pub fn raise_nofile_limit() -> (u64, u64) {
    let (soft, hard) = nofile_limit();
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct we own.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    nofile_limit()
}

/// A connection used one request at a time (set-up: register, login, open).
pub struct Conn {
    ws: Ws,
    rid: u64,
}

impl Conn {
    pub async fn connect(target: &Target) -> anyhow::Result<Conn> {
        let (stream, url) = target.dial().await?;
        // Nagle off: a small frame written right after another must not wait for the peer's
        // delayed ACK (~40 ms). Set here: tokio-tungstenite's own flag did not reach the socket.
        stream.set_nodelay(true)?;
        // Write each frame as it is sent: the load generator's own batching would show up as
        // server latency.
        let config = WebSocketConfig {
            write_buffer_size: 0,
            ..WebSocketConfig::default()
        };
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            url,
            MaybeTlsStream::Plain(stream),
            Some(config),
        )
        .await
        .with_context(|| format!("WebSocket handshake with {url}"))?;
        Ok(Conn { ws, rid: 0 })
    }

    /// Sends a request and waits for its reply (pushes meanwhile are dropped: set-up only).
    pub async fn request(&mut self, op: &str, mut fields: Value) -> anyhow::Result<Value> {
        self.rid += 1;
        fields["op"] = json!(op);
        fields["rid"] = json!(self.rid);
        self.ws.send(Message::text(fields.to_string())).await?;
        loop {
            let next = tokio::time::timeout(REQUEST_TIMEOUT, self.ws.next())
                .await
                .context("request timed out")?;
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t)?;
                    if v["rid"] == json!(self.rid) {
                        return Ok(v);
                    }
                }
                Some(Ok(Message::Close(f))) => bail!("server closed the connection: {f:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("connection closed"),
            }
        }
    }

    /// Like `request`, but an error reply is an error.
    pub async fn ok(&mut self, op: &str, fields: Value) -> anyhow::Result<Value> {
        let r = self.request(op, fields).await?;
        match r.get("ok") {
            Some(ok) => Ok(ok.clone()),
            None => bail!("{op} failed: {}", r["error"]),
        }
    }

    pub fn next_rid(&self) -> u64 {
        self.rid + 1
    }

    pub fn split(self) -> (Writer, Reader) {
        self.ws.split()
    }

    /// The socket under the WebSocket, for a reader that frames by hand (see
    /// `open_loop::receiver_conn`). Only between requests, when the server has nothing more
    /// to send: bytes the WebSocket client had read ahead stay behind with it (the runs'
    /// lost/duplicated accounting would show it). The client has no `into_inner`, so the fd is
    /// duplicated and the client dropped (dropping it sends no close frame).
    pub fn into_tcp(self) -> anyhow::Result<TcpStream> {
        let MaybeTlsStream::Plain(s) = self.ws.get_ref() else {
            bail!("not a plain TCP connection");
        };
        // SAFETY: dup of an fd the client owns; the result is a fresh fd owned by nothing else.
        let fd = unsafe { libc::dup(s.as_raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("dup");
        }
        // SAFETY: `fd` is a valid, open, unowned descriptor (checked above).
        let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        drop(self);
        std.set_nonblocking(true)?;
        Ok(TcpStream::from_std(std)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_lists_and_ranges() {
        let got = parse_sources("127.0.0.1-127.0.0.3, ::1,127.0.1.9").unwrap();
        let want: Vec<IpAddr> = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1", "127.0.1.9"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        assert!(parse_sources("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_sources("nonsense").is_err());
        assert!(parse_sources(" , ").is_err());
    }

    #[test]
    fn connections_spread_over_sources() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("ws://{}/ws", listener.local_addr().unwrap());
            let target = Target::new(&url, parse_sources("127.0.0.2-127.0.0.4").unwrap()).unwrap();
            let mut seen = Vec::new();
            for _ in 0..6 {
                let (stream, _) = target.dial().await.unwrap();
                seen.push(stream.local_addr().unwrap().ip().to_string());
                let (_peer, from) = listener.accept().await.unwrap();
                assert_eq!(from.ip(), stream.local_addr().unwrap().ip());
            }
            let want = ["127.0.0.2", "127.0.0.3", "127.0.0.4"].repeat(2);
            assert_eq!(seen, want);
        });
    }

    #[test]
    fn several_urls_take_connections_in_turn() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (ua, ub) = (
                format!("ws://{}/ws", a.local_addr().unwrap()),
                format!("ws://{}/ws", b.local_addr().unwrap()),
            );
            let target = Target::new(&format!("{ua}, {ub}"), Vec::new()).unwrap();
            let mut urls = Vec::new();
            for _ in 0..4 {
                let (_, url) = target.dial().await.unwrap();
                urls.push(url.to_owned());
            }
            assert_eq!(urls, [ua.clone(), ub.clone(), ua, ub]);
        });
    }

    #[test]
    fn bad_urls_are_refused() {
        assert!(Target::new("http://x/ws", Vec::new()).is_err());
        assert!(Target::new("ws:///ws", Vec::new()).is_err());
    }
}
