//! The driver's side of the links to other nodes (issue 13): mail for a shard of another node
//! goes into the shard's `Remotes` (sans-IO, `hermod_shards::remote`), and one task per shard
//! moves its batches to and from the NATS thread (`nats.rs`).
//!
//! The link task wakes when frames are due (mail sent this turn, an ack owed) or when the links'
//! next deadline comes (hello, resend, silence), at most `LINK_TICK_MAX_MS` apart for metrics.
//! Everything a turn of the reactor sends to the shards of one node leaves as one NATS message
//! (several, if they outgrow `remote::MESSAGE_BYTES_MAX`).
//!
//! Full-channel policy: publishing waits in the link task (never in the reactor's dispatch)
//! while the NATS thread's bounded channel is full; mail meanwhile queues in the links' windows
//! and then their waiting FIFOs, whose depth closes the shard's admission gate
//! (`ShardCtx::overloaded`). Inbound, the NATS thread waits on a full shard channel, NATS may
//! drop for this process as a slow consumer, and the links resend.

use std::time::Duration;

use glommio::channels::local_channel::LocalReceiver;
use hermod_shards::mail::Mail;
use hermod_shards::remote::RemoteEvent;
use hermod_shards::ShardId;

use crate::ctx::{dispatch, now_ms, Ctx};
use crate::nats::Outgoing;

/// Longest sleep of the link task: how stale its metrics may get.
const LINK_TICK_MAX_MS: u64 = 250;

/// Mail from the engine for `to`, a shard of another node. Refused at once while the link is
/// down: the engine fails what it must (`handle_undeliverable`).
pub fn send(ctx: &Ctx, to: ShardId, mail: Mail) {
    let now = now_ms();
    let refused = ctx.remotes.borrow_mut().send(now, to, mail);
    match refused {
        Ok(()) => {
            let _ = ctx.transmit.try_send(());
        }
        Err(mail) => ctx.engine.borrow_mut().handle_undeliverable(now, *mail),
    }
}

/// Starts the shard's two link tasks: batches in from the NATS thread, and batches out.
/// `subjects[n]` is node `n`'s subject.
pub fn spawn(
    ctx: &Ctx,
    inbox: async_channel::Receiver<Vec<u8>>,
    out: async_channel::Sender<Outgoing>,
    subjects: Vec<String>,
    woken: LocalReceiver<()>,
) -> (glommio::Task<()>, glommio::Task<()>) {
    let inbox_len = inbox.clone();
    let inbound = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Ok(batch) = inbox.recv().await {
                let now = now_ms();
                let received = ctx.remotes.borrow_mut().receive(now, &batch);
                match received {
                    Ok(events) => apply(&ctx, now, events),
                    Err(e) => {
                        tracing::warn!(shard = %ctx.id, error = %e, "batch from NATS refused")
                    }
                }
                // Acks (and mail freed from a waiting FIFO) are due out.
                let _ = ctx.transmit.try_send(());
            }
        })
    };
    let outbound = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                let now = now_ms();
                let behind = !inbox_len.is_empty();
                let events = ctx.remotes.borrow_mut().handle_timeout(now, behind);
                apply(&ctx, now, events);
                let batches = ctx.remotes.borrow_mut().poll_transmit(now);
                for (node, payload) in hermod_shards::remote::pack(batches) {
                    let subject = subjects[node].clone();
                    if out.send(Outgoing { subject, payload }).await.is_err() {
                        return; // the NATS thread ended: only at shutdown
                    }
                }
                let next = ctx.remotes.borrow().poll_timeout().unwrap_or(u64::MAX);
                let now = now_ms();
                let sleep = next.saturating_sub(now).min(LINK_TICK_MAX_MS);
                futures_lite::future::or(
                    glommio::timer::sleep(Duration::from_millis(sleep)),
                    async {
                        let _ = woken.recv().await;
                    },
                )
                .await;
            }
        })
    };
    (inbound, outbound)
}

/// Hands what the links say to the engine, then carries out the engine's outputs.
fn apply(ctx: &Ctx, now: u64, events: Vec<RemoteEvent>) {
    if events.is_empty() {
        return;
    }
    {
        let mut engine = ctx.engine.borrow_mut();
        for event in events {
            match event {
                RemoteEvent::Mail(mail) => engine.handle_mail(now, mail),
                RemoteEvent::Up(shard) => engine.handle_link_up(now, shard),
                RemoteEvent::Lost { mails, .. } => {
                    for mail in mails {
                        engine.handle_undeliverable(now, mail);
                    }
                }
            }
        }
    }
    dispatch(ctx);
}
