//! The HTTP APIs answered by the engine: the admin API (bearer token compared in constant
//! time; `hermod_shards::admin`, `docs/admin.md`) and the bots' `POST /bot/api` (the engine
//! checks the bot token; `docs/bots.md`). Each request runs as a pseudo-connection of the
//! engine and this waits for its one answer (at most `ADMIN_TIMEOUT` or `BOT_TIMEOUT`).

use std::time::Duration;

use glommio::channels::local_channel;
use hermod_shards::admin::{status_of, AdminOp};
use subtle::ConstantTimeEq;

use crate::ctx::{dispatch, now_ms, Ctx};
use crate::http;

/// Longest an admin request may run: a bulk creation of `ADMIN_CREATE_MAX` users hashes each
/// password at full cost, one at a time per shard.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(300);

/// An admin answer: HTTP status and JSON body.
pub type AdminAnswer = (u16, String);

pub fn admin_error(status: u16, code: &str, message: &str) -> AdminAnswer {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, body.to_string())
}

/// The admin API is on and the request carries its token.
pub fn admin_auth(ctx: &Ctx, req: &http::AdminRequest) -> Result<(), AdminAnswer> {
    let Some(token) = &ctx.admin_token else {
        return Err(admin_error(
            404,
            "admin_disabled",
            "the admin API is off: configure admin_token",
        ));
    };
    let presented = req.bearer.as_deref().unwrap_or("");
    // Constant time, so the comparison does not leak how much of a guess was right.
    if !bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
        tracing::debug!(shard = %ctx.id, path = req.path, "admin request with a wrong or missing token");
        return Err(admin_error(
            401,
            "unauthorized",
            "send the admin token as Authorization: Bearer <token>",
        ));
    }
    Ok(())
}

/// Runs one authenticated admin request: stats from the board, or the engine's answer.
pub async fn admin(ctx: &Ctx, req: &http::AdminRequest, body: &[u8]) -> AdminAnswer {
    let error = admin_error;
    let body_bytes_max = ctx.engine.borrow().config().body_bytes_max;
    let op = match AdminOp::parse(&req.method, &req.path, body, body_bytes_max) {
        Ok(AdminOp::Stats) => return (200, ctx.board.stats_json().to_string()),
        Ok(op) => op,
        Err((code, message)) => return error(status_of(Some(code)), code.as_str(), &message),
    };
    tracing::info!(shard = %ctx.id, op = %op.summary(), "admin request");
    answer_of(ctx, ADMIN_TIMEOUT, |engine, conn| {
        engine.handle_admin(now_ms(), conn, op)
    })
    .await
}

/// A bot's request carries a bearer token (whether it is a valid bot token, the engine says).
pub fn bot_auth(req: &http::AdminRequest) -> Result<(), AdminAnswer> {
    match req.bearer.as_deref() {
        Some(token) if !token.is_empty() => Ok(()),
        _ => Err(admin_error(
            401,
            "bad_credentials",
            "send the bot token as Authorization: Bearer <token>",
        )),
    }
}

/// Runs one bot request (`POST /bot/api`): its body is one request frame, answered with the
/// reply frame a WebSocket client would get.
pub async fn bot_call(ctx: &Ctx, req: &http::AdminRequest, body: &[u8]) -> AdminAnswer {
    let Ok(frame) = std::str::from_utf8(body) else {
        return admin_error(400, "bad_json", "the body is not UTF-8");
    };
    let token = req.bearer.clone().unwrap_or_default();
    let frame = frame.to_owned();
    answer_of(ctx, BOT_TIMEOUT, |engine, conn| {
        engine.handle_bot_http(now_ms(), conn, &token, frame)
    })
    .await
}

/// Longest a bot's HTTP request may wait: the cross-node deadline's order, with room.
const BOT_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts a request of the engine's on a fresh pseudo-connection and waits (at most
/// `timeout`) for its one answer, which arrives through `dispatch` (`Output::AdminReply`) on a
/// one-slot channel: such a request needs no outbox, so connections carry no field for it.
async fn answer_of(
    ctx: &Ctx,
    timeout: Duration,
    start: impl FnOnce(&mut hermod_shards::Shard<hermod_store::RocksStorage>, hermod_shards::ConnId),
) -> AdminAnswer {
    let error = admin_error;
    let conn = ctx.new_conn_id();
    let (answer_tx, answer_rx) = local_channel::new_bounded(1);
    ctx.admin_waiters.borrow_mut().insert(conn, answer_tx);
    start(&mut ctx.engine.borrow_mut(), conn);
    dispatch(ctx);
    let answered = async {
        answer_rx
            .recv()
            .await
            .unwrap_or_else(|| error(500, "internal", "the request was dropped unanswered"))
    };
    let timeout = async {
        glommio::timer::sleep(timeout).await;
        error(
            504,
            "timeout",
            "the request did not finish in time; it may still complete",
        )
    };
    let answer = futures_lite::future::or(answered, timeout).await;
    ctx.admin_waiters.borrow_mut().remove(&conn);
    ctx.engine.borrow_mut().handle_disconnect(now_ms(), conn);
    dispatch(ctx);
    answer
}
