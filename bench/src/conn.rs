//! One benchmark connection, split into a writer half (owned by the scenario's send loop)
//! and a reader half (a task that sorts replies and pushes).

use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Writer = SplitSink<Ws, Message>;
pub type Reader = SplitStream<Ws>;

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection used one request at a time (set-up: register, login, open).
pub struct Conn {
    ws: Ws,
    rid: u64,
}

impl Conn {
    pub async fn connect(url: &str) -> anyhow::Result<Conn> {
        let addr = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .with_context(|| format!("{url}: only ws://HOST:PORT/... URLs are supported"))?;
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
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
}
