//! One client socket on its shard: the HTTP request, the WebSocket upgrade, then frames in
//! and out until close or hand-off (the admin API's requests go on to `admin_http.rs`).
//!
//! One task per connection does both directions: it waits for either readable bytes or work
//! in its [`Outbox`], so no lock or split stream is needed. Bytes read go to the shard's
//! shared scratch buffer, then to the connection's buffer until decoded; that buffer is
//! released when drained if it grew past `KEEP_BUFFER_BYTES`, so idle connections stay small.
//!
//! Writes time out after `WRITE_TIMEOUT`, so a peer that stops reading cannot pin a task.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use hermod_shards::engine::Handoff;
use hermod_shards::protocol::close;
use hermod_shards::{ConnId, ShardId};

use crate::admin_http::{admin, admin_auth, admin_error, bot_auth, bot_call};
use crate::ctx::{dispatch, now_ms, Ctx};
use crate::http::{self, Route};
use crate::mesh::Envelope;
use crate::metrics::Refusal;
use crate::outbox::{Close, Outbox};
use crate::ws::{self, Decoder, Message};

const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the server's close frame: how long the peer's remaining bytes are read and discarded
/// (until its close frame and EOF). Closing a socket with unread bytes makes the kernel send a
/// reset, which can destroy the close frame before the client reads it; the linger makes the
/// close observable. Bounded in time and bytes, so a peer that keeps sending cannot hold it.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
const CLOSE_LINGER_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Time allowed for the HTTP request (its head, and an admin request's body) to arrive in
/// full, however slowly it trickles in.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a media request's body (an upload chunk) may take to arrive whole.
const MEDIA_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Kept between messages only if small: an idle connection should hold (almost) nothing.
const KEEP_BUFFER_BYTES: usize = 4 * 1024;

enum Event {
    Readable,
    Work,
    Eof,
    /// The deadline of `next_event_by` passed first.
    Expired,
    Failed(std::io::Error),
}

/// Waits until the socket has bytes (appended to `inbuf`) or the outbox has work.
async fn next_event(
    ctx: &Ctx,
    stream: &mut TcpStream,
    inbuf: &mut Vec<u8>,
    outbox: &Outbox,
) -> Event {
    futures_lite::future::poll_fn(|cx| {
        if outbox.has_work() {
            return Poll::Ready(Event::Work);
        }
        outbox.set_waker(cx.waker());
        let mut scratch = ctx.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) => Poll::Ready(Event::Eof),
            Poll::Ready(Ok(n)) => {
                inbuf.extend_from_slice(&scratch[..n]);
                Poll::Ready(Event::Readable)
            }
            Poll::Ready(Err(e)) => Poll::Ready(Event::Failed(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// `next_event`, or `Expired` once `deadline` has passed: a request that has not arrived in
/// full by then is dropped.
async fn next_event_by(
    ctx: &Ctx,
    stream: &mut TcpStream,
    inbuf: &mut Vec<u8>,
    outbox: &Outbox,
    deadline: std::time::Instant,
) -> Event {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let expired = async {
        glommio::timer::sleep(left).await;
        Event::Expired
    };
    futures_lite::future::or(next_event(ctx, stream, inbuf, outbox), expired).await
}

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    /// Everything: no separate admin address is configured.
    All,
    /// Clients (page, WebSocket) and status pages; `/admin/…` lives on the admin address.
    Public,
    /// The admin address: `/admin/…` and the status pages only.
    Admin,
}

impl Surface {
    /// The answer to a route this surface does not serve, if it does not.
    fn refuse(self, route: &Route) -> Option<Vec<u8>> {
        let (code, message) = match (self, route) {
            (Surface::Public, Route::Admin(_)) => (
                "admin_elsewhere",
                "the admin API is served on the admin address (admin_listen)",
            ),
            (
                Surface::Admin,
                Route::Respond(_) | Route::Upgrade { .. } | Route::Bot(_) | Route::Media(_),
            ) => (
                "unknown_op",
                "the admin address serves /admin/ and the status pages only",
            ),
            _ => return None,
        };
        Some(http::json(404, &admin_error(404, code, message).1))
    }
}

pub fn spawn_accepted(ctx: &Ctx, stream: TcpStream, surface: Surface) {
    let ctx = ctx.clone();
    let fut = async move {
        // Two phases awaited one after the other, not one inside the other, and the HTTP
        // phase boxed: a task keeps its largest state for the connection's whole life, so an
        // idle WebSocket connection pays only for the WebSocket phase (measured with
        // hermod-bench idle: 3.2 KB per connection nested, 2.8 KB split).
        let result = match Box::pin(serve_http(&ctx, stream, surface)).await {
            Ok(Some((stream, inbuf))) => {
                let conn = ctx.new_conn_id();
                let outbox = register(&ctx, conn);
                ctx.engine.borrow_mut().handle_connect(now_ms(), conn);
                serve_ws(&ctx, conn, stream, inbuf, outbox).await
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::debug!(shard = %ctx.id, error = %e, "connection ended with an error");
        }
    };
    glommio::spawn_local(fut).detach();
}

pub fn spawn_adopted(ctx: &Ctx, stream: TcpStream, buffered: Vec<u8>, handoff: Handoff) {
    let ctx = ctx.clone();
    glommio::spawn_local(async move {
        if let Err(e) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
            tracing::debug!(shard = %ctx.id, error = %e, "adopted socket unusable");
            return;
        }
        let conn = ctx.new_conn_id();
        let outbox = register(&ctx, conn);
        ctx.engine
            .borrow_mut()
            .handle_adopt(now_ms(), conn, handoff);
        dispatch(&ctx);
        if let Err(e) = serve_ws(&ctx, conn, stream, buffered, outbox).await {
            tracing::debug!(shard = %ctx.id, error = %e, "connection ended with an error");
        }
    })
    .detach();
}

fn register(ctx: &Ctx, conn: ConnId) -> Rc<Outbox> {
    let outbox = Rc::new(Outbox::default());
    ctx.conns.borrow_mut().insert(conn, outbox.clone());
    outbox
}

/// The HTTP phase. Returns the stream and any bytes read past the head when the request was
/// a WebSocket upgrade (answered with 101), `None` when the response closed the connection.
async fn serve_http(
    ctx: &Ctx,
    mut stream: TcpStream,
    surface: Surface,
) -> std::io::Result<Option<(TcpStream, Vec<u8>)>> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.set_read_timeout(Some(HEAD_TIMEOUT))?;
    let mut inbuf = Vec::new();
    let idle = Outbox::default();
    let deadline = std::time::Instant::now() + HEAD_TIMEOUT;
    let shard = ctx.local;
    let route = loop {
        match next_event_by(ctx, &mut stream, &mut inbuf, &idle, deadline).await {
            Event::Readable => {
                tracing::trace!(bytes = inbuf.len(), "http bytes");
                if let Some(route) = http::route(&inbuf) {
                    break route;
                }
            }
            Event::Expired => {
                ctx.board.count_refusal(shard, Refusal::HttpHeadTimeout);
                return Ok(None);
            }
            Event::Eof | Event::Work => return Ok(None),
            Event::Failed(e) => return Err(e),
        }
    };
    if let Some(refusal) = surface.refuse(&route) {
        ctx.board.count_refusal(shard, Refusal::HttpNotFound);
        stream.write_all(&refusal).await?;
        return stream.close().await.map(|()| None);
    }
    match route {
        Route::Respond(response) => {
            if let Some(refusal) = http::response_status(&response).and_then(Refusal::of_status) {
                ctx.board.count_refusal(shard, refusal);
            }
            stream.write_all(&response).await?;
            stream.close().await.map(|()| None)
        }
        Route::Status(page) => {
            stream.write_all(&http::status(page, &ctx.board)).await?;
            stream.close().await.map(|()| None)
        }
        Route::Media(req) => {
            // Bounded: each body is buffered whole (up to chunk_max) before it is stored.
            let counted = usize::from(req.body_len > 0);
            if counted == 1 && ctx.media_bodies.get() >= crate::media::BODIES_IN_FLIGHT_MAX {
                let busy = http::head(503, &[("Retry-After", "1".into())], 0);
                stream.write_all(busy.as_bytes()).await?;
                return stream.close().await.map(|()| None);
            }
            ctx.media_bodies.set(ctx.media_bodies.get() + counted);
            // A chunk may take longer than a request head: a minute to arrive whole.
            let body_deadline = std::time::Instant::now() + MEDIA_BODY_TIMEOUT;
            stream.set_read_timeout(Some(MEDIA_BODY_TIMEOUT))?;
            let wanted = req.head_len + req.body_len;
            inbuf.reserve(wanted.saturating_sub(inbuf.len())); // one allocation per chunk
            let mut complete = true;
            while inbuf.len() < wanted {
                match next_event_by(ctx, &mut stream, &mut inbuf, &idle, body_deadline).await {
                    Event::Readable => {}
                    // A chunk cut short is not stored: the client resumes from the stored
                    // offset (HEAD).
                    Event::Eof | Event::Work | Event::Expired | Event::Failed(_) => {
                        complete = false;
                        break;
                    }
                }
            }
            let result = if complete {
                inbuf.truncate(wanted);
                crate::media::serve(ctx, &req, std::mem::take(&mut inbuf), &mut stream).await
            } else {
                Ok(())
            };
            ctx.media_bodies.set(ctx.media_bodies.get() - counted);
            result?;
            stream.close().await.map(|()| None)
        }
        Route::Admin(req) | Route::Bot(req) => {
            let bot = req.path == "/bot/api";
            // Refused before the body is read: an unauthenticated client costs no buffer.
            let refused = if bot {
                bot_auth(&req)
            } else {
                admin_auth(ctx, &req)
            };
            if let Err((status, body)) = refused {
                stream.write_all(&http::json(status, &body)).await?;
                return stream.close().await.map(|()| None);
            }
            let wanted = req.head_len + req.body_len;
            while inbuf.len() < wanted {
                match next_event_by(ctx, &mut stream, &mut inbuf, &idle, deadline).await {
                    Event::Readable => {}
                    Event::Eof | Event::Work | Event::Expired => return Ok(None),
                    Event::Failed(e) => return Err(e),
                }
            }
            let body = &inbuf[req.head_len..wanted];
            let (status, body) = if bot {
                bot_call(ctx, &req, body).await
            } else {
                admin(ctx, &req, body).await
            };
            stream.write_all(&http::json(status, &body)).await?;
            stream.close().await.map(|()| None)
        }
        Route::Upgrade { response, head_len } => {
            stream.set_read_timeout(None)?;
            stream.write_all(&response).await?;
            inbuf.drain(..head_len);
            Ok(Some((stream, inbuf)))
        }
    }
}

/// The WebSocket phase. Ends on close, error, or hand-off; always unregisters the connection.
async fn serve_ws(
    ctx: &Ctx,
    conn: ConnId,
    stream: TcpStream,
    inbuf: Vec<u8>,
    outbox: Rc<Outbox>,
) -> std::io::Result<()> {
    let result = ws_loop(ctx, conn, stream, inbuf, &outbox).await;
    ctx.conns.borrow_mut().remove(&conn);
    ctx.engine.borrow_mut().handle_disconnect(now_ms(), conn);
    dispatch(ctx);
    match result? {
        Some(stream) => linger(ctx, stream).await,
        None => Ok(()),
    }
}

/// The end of a close the server sent: no more writes (FIN after the close frame), then the
/// peer's remaining bytes are read and discarded until it closes too, for at most
/// `CLOSE_LINGER` and `CLOSE_LINGER_BYTES_MAX`. Only then is the socket closed, so the kernel
/// does not answer unread bytes with a reset that could destroy the close frame in flight.
async fn linger(ctx: &Ctx, mut stream: TcpStream) -> std::io::Result<()> {
    // An error here means the peer is gone already: nothing left to protect.
    if stream.shutdown(std::net::Shutdown::Write).await.is_ok() {
        let deadline = std::time::Instant::now() + CLOSE_LINGER;
        let mut discarded = 0;
        let mut sink = Vec::new();
        let idle = Outbox::default();
        while discarded < CLOSE_LINGER_BYTES_MAX {
            match next_event_by(ctx, &mut stream, &mut sink, &idle, deadline).await {
                Event::Readable => {
                    discarded += sink.len();
                    sink.clear();
                }
                Event::Eof | Event::Work | Event::Expired | Event::Failed(_) => break,
            }
        }
    }
    stream.close().await
}

/// Serves frames until the connection ends: `Some(stream)` once the server's close frame is
/// written (the caller lingers, then closes), `None` when the peer went away or the socket
/// moved to another shard.
async fn ws_loop(
    ctx: &Ctx,
    conn: ConnId,
    mut stream: TcpStream,
    mut inbuf: Vec<u8>,
    outbox: &Outbox,
) -> std::io::Result<Option<TcpStream>> {
    let mut decoder = Decoder::default();
    let mut out = Vec::new();
    loop {
        // Everything complete in the buffer first; stop at a hand-off, leaving the rest raw.
        let mut used = 0;
        while !outbox.stop_reading() {
            while ctx.overloaded() {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            match decoder.decode(&mut inbuf[used..], ctx.frame_bytes_max) {
                Ok((message, n)) => {
                    used += n;
                    match message {
                        Some(Message::Text(text)) => {
                            ctx.engine.borrow_mut().handle_frame(now_ms(), conn, &text);
                            dispatch(ctx);
                        }
                        Some(Message::Ping(payload)) => {
                            outbox.push_pong(&payload);
                            ctx.engine.borrow_mut().handle_activity(now_ms(), conn);
                        }
                        Some(Message::Pong) => {
                            ctx.engine.borrow_mut().handle_activity(now_ms(), conn)
                        }
                        Some(Message::Close(code)) => {
                            // The client closed first: echo its code (RFC 6455 §5.5.1).
                            ctx.board.count_peer_close(ctx.local);
                            outbox.close_echo(code.unwrap_or(close::NORMAL));
                            break;
                        }
                        None => break,
                    }
                }
                Err(e) => {
                    outbox.close(e.code, e.reason);
                    break;
                }
            }
        }
        inbuf.drain(..used);
        if inbuf.is_empty() && inbuf.capacity() > KEEP_BUFFER_BYTES {
            inbuf = Vec::new();
        }

        // Flush, then act on a close or a hand-off.
        let (close, handoff) = outbox.take_work(&mut out);
        let bytes = !out.is_empty();
        if bytes {
            stream.write_all(&out).await?;
            out.clear();
            if out.capacity() > KEEP_BUFFER_BYTES {
                out = Vec::new();
            }
        }
        if let Some(Close {
            code,
            reason,
            by_peer,
        }) = close
        {
            if !by_peer {
                ctx.board.count_close(ctx.local, code, reason);
            }
            let mut frame = Vec::new();
            ws::encode_close(&mut frame, code, reason);
            stream.write_all(&frame).await?;
            return Ok(Some(stream));
        }
        if let Some((to, handoff)) = handoff {
            // A fragmented message in progress travels too, as a frame before the raw bytes.
            let buffered = decoder.suspend(inbuf);
            return hand_off(ctx, stream, buffered, to, handoff).map(|()| None);
        }
        if bytes {
            continue; // more may have queued while writing
        }
        match next_event(ctx, &mut stream, &mut inbuf, outbox).await {
            Event::Readable | Event::Work => {}
            Event::Eof | Event::Expired => return Ok(None),
            Event::Failed(e) => return Err(e),
        }
    }
}

/// Moves the socket to shard `to`. The fd is duplicated because glommio's stream closes its
/// own fd on drop; the duplicate keeps the socket open on its way.
fn hand_off(
    ctx: &Ctx,
    stream: TcpStream,
    buffered: Vec<u8>,
    to: ShardId,
    handoff: Handoff,
) -> std::io::Result<()> {
    // SAFETY: dup of an fd we own; the result is a fresh fd owned by nothing else.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a valid, open, unowned descriptor (checked above).
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    drop(stream);
    ctx.send_envelope(
        to,
        Envelope::Adopt {
            fd,
            buffered,
            handoff,
        },
    );
    Ok(())
}
