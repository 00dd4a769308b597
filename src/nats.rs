//! The NATS side of the cluster transport (issue 13): one OS
//! thread per process runs a tokio runtime with `async-nats`, which needs tokio, and glommio
//! shards reach it through bounded `async-channel`s, which wake tasks of either runtime (a send
//! from a glommio task wakes the tokio task, and the reverse). Chosen over a NATS client written
//! on glommio: the client is maintained upstream (reconnects, TLS, auth), and the bridge costs
//! a channel hop per batch of mail, not per byte.
//!
//! Core NATS delivers at most once and drops messages for a slow subscriber: order, bounds and
//! resends are the link layer's (`hermod_shards::link`), never this file's.
//!
//! Policy when a channel is full: outbound, the sending task waits (a shard's pump task, never
//! its reactor loop); inbound, the NATS thread waits, so NATS may drop for this process as a
//! slow consumer, and the link layer resends what was dropped.

use std::thread::JoinHandle;
use std::time::Duration;

/// Longest wait, when the bridge ends, for NATS to take what was published.
const FLUSH_AT_EXIT_MAX: Duration = Duration::from_secs(1);

/// Where NATS is and how to log in.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`), any of the cluster's.
    pub urls: Vec<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// An nkey seed (`SU…`): authenticates by signing the server's nonce, no password sent.
    pub nkey_seed: Option<String>,
    /// TLS to NATS: required, with these extra root certificates and this client certificate
    /// and key (PEM files), if given.
    pub tls: bool,
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// This connection's name in NATS's monitoring (e.g. `hermod-<node>`).
    pub name: String,
    /// Longest wait for the first connection.
    pub connect_timeout: Duration,
}

/// A message to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    pub payload: Vec<u8>,
}

/// A message received on one of the bridge's subscriptions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub subject: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("connecting to NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error("subscribing to {subject} on NATS: {reason}")]
    Subscribe { subject: String, reason: String },
    #[error("starting the NATS thread: {0}")]
    Thread(String),
}

/// A running bridge. Dropping it (its `out` sender with it) ends the NATS thread.
pub struct Bridge {
    /// Messages to publish, in order.
    pub out: async_channel::Sender<Outgoing>,
    /// Messages received on the subscriptions; per publisher, in its publish order. Closed
    /// (empty) for a routed bridge, whose messages go to the routes instead.
    pub inbox: async_channel::Receiver<Incoming>,
    thread: Option<JoinHandle<()>>,
}

/// Splits a received payload among the routes: `(route, bytes of the payload)` for each part,
/// in order (none: the payload is dropped, with a warning).
pub type Router = Box<dyn Fn(&[u8]) -> Vec<(usize, std::ops::Range<usize>)> + Send + Sync>;

/// Where received messages go.
enum Sink {
    Inbox(async_channel::Sender<Incoming>),
    /// Payloads split by `router` among `routes` (a node's shards), each route a bounded
    /// channel: per publisher, each route sees its parts in publish order.
    Routed {
        routes: Vec<async_channel::Sender<Vec<u8>>>,
        router: Router,
    },
}

impl Sink {
    /// False once the receiving side is gone.
    async fn deliver(&self, subject: &str, payload: &[u8]) -> bool {
        match self {
            Sink::Inbox(inbox) => inbox
                .send(Incoming {
                    subject: subject.to_owned(),
                    payload: payload.to_vec(),
                })
                .await
                .is_ok(),
            Sink::Routed { routes, router } => {
                let parts = router(payload);
                if parts.is_empty() {
                    // Malformed, or not for a shard of this node (another map's traffic).
                    tracing::warn!(%subject, bytes = payload.len(), "NATS message with no route dropped");
                }
                for (i, range) in parts {
                    let (Some(route), Some(part)) = (routes.get(i), payload.get(range)) else {
                        continue;
                    };
                    if route.send(part.to_vec()).await.is_err() {
                        return false;
                    }
                }
                true
            }
        }
    }
}

impl Bridge {
    /// Connects, subscribes to `subjects` and starts forwarding. Returns once connected and
    /// subscribed, or with the reason it could not (wrong credentials, no server reachable).
    /// `capacity` bounds each direction's channel.
    pub fn start(
        cfg: NatsConfig,
        subjects: Vec<String>,
        capacity: usize,
    ) -> Result<Bridge, BridgeError> {
        let (inbox_tx, inbox) = async_channel::bounded::<Incoming>(capacity);
        Bridge::spawn(cfg, subjects, capacity, Sink::Inbox(inbox_tx), inbox)
    }

    /// Like `start`, with every received payload sent to `routes[router(payload)]` (one per
    /// shard of this node); payloads no route takes are dropped with a warning.
    pub fn start_routed(
        cfg: NatsConfig,
        subjects: Vec<String>,
        capacity: usize,
        routes: Vec<async_channel::Sender<Vec<u8>>>,
        router: Router,
    ) -> Result<Bridge, BridgeError> {
        let (_, inbox) = async_channel::bounded::<Incoming>(1);
        inbox.close();
        let sink = Sink::Routed { routes, router };
        Bridge::spawn(cfg, subjects, capacity, sink, inbox)
    }

    fn spawn(
        cfg: NatsConfig,
        subjects: Vec<String>,
        capacity: usize,
        sink: Sink,
        inbox: async_channel::Receiver<Incoming>,
    ) -> Result<Bridge, BridgeError> {
        let (out, out_rx) = async_channel::bounded::<Outgoing>(capacity);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("hermod-nats".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(BridgeError::Thread(e.to_string())));
                        return;
                    }
                };
                runtime.block_on(run(cfg, subjects, out_rx, sink, ready_tx));
            })
            .map_err(|e| BridgeError::Thread(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Bridge {
                out,
                inbox,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(BridgeError::Thread("the NATS thread ended".into())),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.out.close();
        self.inbox.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn run(
    cfg: NatsConfig,
    subjects: Vec<String>,
    out: async_channel::Receiver<Outgoing>,
    sink: Sink,
    ready: std::sync::mpsc::Sender<Result<(), BridgeError>>,
) {
    use futures_util::StreamExt;

    let urls = cfg.urls.join(",");
    let mut options = async_nats::ConnectOptions::new()
        .name(&cfg.name)
        .connection_timeout(cfg.connect_timeout);
    if let (Some(user), Some(password)) = (cfg.user.clone(), cfg.password.clone()) {
        options = options.user_and_password(user, password);
    }
    if let Some(seed) = cfg.nkey_seed.clone() {
        options = options.nkey(seed);
    }
    if cfg.tls {
        options = options.require_tls(true);
    }
    if let Some(ca) = cfg.tls_ca.clone() {
        options = options.add_root_certificates(ca);
    }
    if let Some((cert, key)) = cfg.tls_client.clone() {
        options = options.add_client_certificate(cert, key);
    }
    let mut servers = Vec::new();
    for url in &cfg.urls {
        match url.parse::<async_nats::ServerAddr>() {
            Ok(addr) => servers.push(addr),
            Err(e) => {
                let reason = format!("{url:?}: {e}");
                let _ = ready.send(Err(BridgeError::Connect { urls, reason }));
                return;
            }
        }
    }
    let connected = tokio::time::timeout(cfg.connect_timeout, options.connect(servers)).await;
    let client = match connected {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            let reason = e.to_string();
            let _ = ready.send(Err(BridgeError::Connect { urls, reason }));
            return;
        }
        Err(_) => {
            let reason = format!("no answer within {:?}", cfg.connect_timeout);
            let _ = ready.send(Err(BridgeError::Connect { urls, reason }));
            return;
        }
    };
    let sink = std::sync::Arc::new(sink);
    let mut forwarders = Vec::new();
    for subject in subjects {
        let mut sub = match client.subscribe(subject.clone()).await {
            Ok(sub) => sub,
            Err(e) => {
                let reason = e.to_string();
                let _ = ready.send(Err(BridgeError::Subscribe { subject, reason }));
                return;
            }
        };
        let sink = sink.clone();
        forwarders.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if !sink.deliver(&msg.subject, &msg.payload).await {
                    break; // the bridge was dropped
                }
            }
        }));
    }
    // Subscriptions reach the server before `start` returns, so nothing published to them
    // after it is missed.
    if let Err(e) = client.flush().await {
        let _ = ready.send(Err(BridgeError::Connect {
            urls,
            reason: e.to_string(),
        }));
        return;
    }
    let _ = ready.send(Ok(()));
    while let Ok(msg) = out.recv().await {
        if let Err(e) = client.publish(msg.subject, msg.payload.into()).await {
            // Only when the client is closed: the link layer resends what is lost.
            tracing::warn!(error = %e, "publishing to NATS failed");
        }
    }
    // What was published goes out if NATS is there; a shutdown never waits on a dead server.
    let _ = tokio::time::timeout(FLUSH_AT_EXIT_MAX, client.flush()).await;
    for forwarder in forwarders {
        forwarder.abort();
    }
}
