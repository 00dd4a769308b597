//! The cluster transport's NATS bridge (`src/nats.rs`) against a real `nats-server` (Debian's,
//! installed by scripts/nats-deps.sh) on loopback, with authentication on: driven from a
//! glommio executor, as the shards will drive it, across the tokio thread that runs async-nats.
//! The last test runs the link layer (`hermod_shards::link`) over a three-server NATS cluster
//! and kills the server one side is connected to in the middle of the transfer.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::nats::{Nats, Tls, PASSWORD};
use hermod::nats::{Bridge, NatsConfig, Outgoing};
use hermod_shards::link::{Frame, Link, LinkEvent};

/// Runs `f` on a glommio executor (as a shard would) and returns its result.
fn on_glommio<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> T {
    glommio::LocalExecutorBuilder::default()
        .io_memory(256 << 10)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

/// The next message on `bridge` within `wait`, as a number.
async fn next(bridge: &Bridge, wait: Duration) -> Option<u64> {
    let recv = async { bridge.inbox.recv().await.ok() };
    let timeout = async {
        glommio::timer::sleep(wait).await;
        None
    };
    let msg = futures_lite::future::or(recv, timeout).await?;
    Some(u64::from_be_bytes(msg.payload.try_into().unwrap()))
}

fn numbered(subject: &str, i: u64) -> Outgoing {
    Outgoing {
        subject: subject.into(),
        payload: i.to_be_bytes().to_vec(),
    }
}

#[test]
fn mail_crosses_nats_in_order_between_glommio_and_tokio() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let a = Bridge::start(nats.config("a", PASSWORD), vec!["hermod.a.>".into()], 1024).unwrap();
    let b = Bridge::start(nats.config("b", PASSWORD), vec!["hermod.b.>".into()], 1024).unwrap();
    const N: u64 = 20_000;
    let started = Instant::now();
    let (got, a, b) = on_glommio(move || {
        Box::pin(async move {
            let out = a.out.clone();
            let sender = glommio::spawn_local(async move {
                for i in 0..N {
                    out.send(numbered("hermod.b.0", i)).await.unwrap();
                }
            });
            let mut got = Vec::new();
            while let Some(i) = next(&b, Duration::from_secs(3)).await {
                got.push(i);
                if i == N - 1 {
                    break;
                }
            }
            sender.await;
            (got, a, b)
        })
    });
    let elapsed = started.elapsed();
    // Core NATS is at most once: on a loaded machine it has dropped the first ~100 mails of a
    // run (CI, 2026-11-30, while other builds ran). Order and no duplicates always hold; what
    // is lost is the link layer's to resend (tested below and in tests/nodes.rs).
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicate"
    );
    let lost = N - got.len() as u64;
    assert!(lost <= N / 50, "lost {lost} of {N}");
    println!(
        "{N} mails over NATS in {elapsed:?}: {:.0}/s, {lost} lost",
        N as f64 / elapsed.as_secs_f64()
    );
    drop((a, b));
}

#[test]
fn wrong_credentials_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let err = Bridge::start(nats.config("x", "wrong"), vec!["hermod.x".into()], 16)
        .err()
        .expect("a wrong password connects");
    assert!(
        err.to_string().to_lowercase().contains("authorization"),
        "{err}"
    );
    let unreachable = NatsConfig {
        urls: vec!["nats://127.0.0.1:1".into()],
        connect_timeout: Duration::from_secs(1),
        ..nats.config("y", PASSWORD)
    };
    assert!(Bridge::start(unreachable, vec![], 16).is_err());
}

#[test]
fn an_nkey_logs_in_and_another_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = nkeys::KeyPair::new_user();
    let nats = Nats::start_nkey(dir.path(), &key.public_key());
    let with = |seed: String| NatsConfig {
        user: None,
        password: None,
        nkey_seed: Some(seed),
        ..nats.config("nk", PASSWORD)
    };
    let bridge = Bridge::start(with(key.seed().unwrap()), vec!["hermod.nk".into()], 16);
    assert!(bridge.is_ok(), "{:?}", bridge.err());
    let other = nkeys::KeyPair::new_user().seed().unwrap();
    let err = Bridge::start(with(other), vec!["hermod.nk".into()], 16)
        .err()
        .expect("another nkey connects");
    assert!(
        err.to_string().to_lowercase().contains("authorization"),
        "{err}"
    );
}

/// NATS requiring TLS and a client certificate: the bridge connects with the CA and its
/// certificate and carries mail; without the certificate, or without the CA (an unknown
/// issuer), it is refused.
#[test]
fn tls_with_a_client_certificate_connects_and_the_rest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tls = Tls::generate(dir.path());
    let nats = Nats::start_tls(dir.path(), &tls);
    let with_tls = |name: &str| NatsConfig {
        tls: true,
        tls_ca: Some(tls.ca.clone()),
        tls_client: Some((tls.client_cert.clone(), tls.client_key.clone())),
        ..nats.config(name, PASSWORD)
    };
    let a = Bridge::start(with_tls("a"), vec!["hermod.a".into()], 64).unwrap();
    let b = Bridge::start(with_tls("b"), vec!["hermod.b".into()], 64).unwrap();
    let (got, a, b) = on_glommio(move || {
        Box::pin(async move {
            // Core NATS may drop the first messages while the subscription settles: resend
            // until one arrives (bounded).
            let mut got = None;
            for i in 0..50 {
                a.out.send(numbered("hermod.b", i)).await.unwrap();
                got = next(&b, Duration::from_millis(100)).await;
                if got.is_some() {
                    break;
                }
            }
            (got, a, b)
        })
    });
    assert!(got.is_some(), "a message crossed NATS over TLS");
    drop((a, b));

    let no_client_cert = NatsConfig {
        tls_client: None,
        connect_timeout: Duration::from_secs(2),
        ..with_tls("c")
    };
    assert!(Bridge::start(no_client_cert, vec![], 16).is_err());
    let unknown_issuer = NatsConfig {
        tls_ca: None,
        connect_timeout: Duration::from_secs(2),
        ..with_tls("d")
    };
    assert!(Bridge::start(unknown_issuer, vec![], 16).is_err());
}

#[test]
fn the_bridge_reconnects_after_nats_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path());
    let a = Bridge::start(nats.config("a", PASSWORD), vec!["hermod.a.>".into()], 64).unwrap();
    let b = Bridge::start(nats.config("b", PASSWORD), vec!["hermod.b.>".into()], 64).unwrap();
    let nats = nats.restart();
    // Core NATS is at most once: what is published while it is down may be lost (the link
    // layer resends it). Keep publishing until mail flows again.
    let (flowed, a, b) = on_glommio(move || {
        Box::pin(async move {
            let mut flowed = false;
            for i in 0..200 {
                a.out.send(numbered("hermod.b.0", i)).await.unwrap();
                if next(&b, Duration::from_millis(100)).await.is_some() {
                    flowed = true;
                    break;
                }
            }
            (flowed, a, b)
        })
    });
    assert!(flowed, "no mail crossed within 20 s of the restart");
    drop((a, b, nats));
}

/// One side of a link over the bridge: sends `count` numbered mails (at most `per_ms` a
/// millisecond) to `to`, runs the link (acks, resends, hellos), and returns the mails it had
/// delivered once `want` arrived (or after `limit`).
async fn link_side(
    bridge: &Bridge,
    inc: u64,
    to: &str,
    count: u64,
    per_ms: u64,
    want: usize,
    limit: Duration,
) -> Vec<u64> {
    let started = Instant::now();
    let now = || started.elapsed().as_millis() as u64;
    let mut link = Link::new(inc, 512, 100);
    let mut delivered = Vec::new();
    let (mut next, mut last_hello) = (0u64, None::<u64>);
    let publish = |frame: Frame| Outgoing {
        subject: to.to_owned(),
        payload: frame.encode(),
    };
    while started.elapsed() < limit {
        let t = now();
        if last_hello.is_none_or(|h| t >= h + 100) {
            last_hello = Some(t);
            bridge
                .out
                .send(publish(Frame::Hello { from_inc: inc }))
                .await
                .unwrap();
        }
        let mut budget = per_ms;
        while next < count && budget > 0 {
            match link.send(t, Arc::from(&next.to_be_bytes()[..])) {
                Ok(frame) => {
                    next += 1;
                    budget -= 1;
                    if let Some(frame) = frame {
                        bridge.out.send(publish(frame)).await.unwrap();
                    }
                }
                Err(_) => break, // window full: wait for acks
            }
        }
        while let Ok(msg) = bridge.inbox.try_recv() {
            let frame = Frame::decode(&msg.payload).expect("a valid frame");
            for event in link.receive(now(), frame) {
                match event {
                    LinkEvent::Deliver(p) => {
                        delivered.push(u64::from_be_bytes(p[..].try_into().unwrap()))
                    }
                    LinkEvent::PeerRestarted { .. } => panic!("no process restarted"),
                }
            }
        }
        for frame in link.poll_transmit(now()) {
            bridge.out.send(publish(frame)).await.unwrap();
        }
        if delivered.len() >= want && next >= count && link.in_flight() == 0 {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    delivered
}

#[test]
fn the_link_layer_loses_nothing_when_a_nats_server_dies_mid_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Nats::cluster(dir.path());
    // `a` knows only the server it will lose; it learns the others from the cluster.
    let a_cfg = servers[0].config("a", PASSWORD);
    let b_cfg = servers[2].config("b", PASSWORD);
    let a = Bridge::start(a_cfg, vec!["hermod.node.a".into()], 4096).unwrap();
    let b = Bridge::start(b_cfg, vec!["hermod.node.b".into()], 4096).unwrap();
    const N: u64 = 30_000;
    let killer = {
        let doomed = servers.remove(0);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(600));
            drop(doomed); // kill -9 the server `a` is connected to, mid-transfer
        })
    };
    let started = Instant::now();
    let (got, a, b) = on_glommio(move || {
        Box::pin(async move {
            let limit = Duration::from_secs(40);
            let sender = glommio::spawn_local(async move {
                link_side(&a, 1, "hermod.node.b", N, 20, 0, limit).await;
                a
            });
            let got = link_side(&b, 2, "hermod.node.a", 0, 0, N as usize, limit).await;
            let a = sender.await;
            (got, a, b)
        })
    });
    killer.join().unwrap();
    let lost = (0..N).filter(|i| got.binary_search(i).is_err()).count();
    let in_order = got.windows(2).all(|w| w[0] < w[1]);
    println!(
        "{} of {N} mails delivered across a NATS server's death in {:?}; lost {lost}, in order {in_order}",
        got.len(),
        started.elapsed()
    );
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "0 lost, 0 duplicated, 0 reordered"
    );
    drop((a, b, servers));
}
