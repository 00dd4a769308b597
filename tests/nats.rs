//! The cluster transport's NATS bridge (`src/nats.rs`) against a real `nats-server` (Debian's,
//! installed by scripts/nats-deps.sh) on loopback, with authentication on: driven from a
//! glommio executor, as the shards will drive it, across the tokio thread that runs async-nats.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hermod::nats::{Bridge, NatsConfig, Outgoing};

const USER: &str = "hermod";
const PASSWORD: &str = "a-test-password";

/// A `nats-server` with user/password auth on a free loopback port; killed on drop.
struct Nats {
    child: Child,
    port: u16,
    conf: PathBuf,
}

fn nats_server_bin() -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
    {
        let bin = Path::new(dir).join("nats-server");
        if bin.exists() {
            return bin;
        }
    }
    panic!("nats-server is not installed: scripts/test.sh installs it (scripts/nats-deps.sh)");
}

impl Nats {
    fn start(dir: &Path) -> Nats {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\nauthorization {{ user: {USER}, password: \"{PASSWORD}\" }}\n"
            ),
        )
        .unwrap();
        Nats::run(conf, port)
    }

    fn run(conf: PathBuf, port: u16) -> Nats {
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nats { child, port, conf }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn config(&self, name: &str, password: &str) -> NatsConfig {
        NatsConfig {
            urls: vec![self.url()],
            user: Some(USER.into()),
            password: Some(password.into()),
            name: name.into(),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// kill -9, then the same server again on the same port.
    fn restart(self) -> Nats {
        let (conf, port) = (self.conf.clone(), self.port);
        drop(self);
        Nats::run(conf, port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
            while let Some(i) = next(&b, Duration::from_secs(10)).await {
                got.push(i);
                if got.len() as u64 == N {
                    break;
                }
            }
            sender.await;
            (got, a, b)
        })
    });
    let elapsed = started.elapsed();
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "every mail once, in order");
    println!(
        "{N} mails over NATS in {elapsed:?}: {:.0}/s",
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
