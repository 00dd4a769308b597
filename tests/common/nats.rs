//! A real `nats-server` (Debian's, installed by scripts/nats-deps.sh) on loopback, with
//! user/password authentication: one server or a three-server cluster with explicit routes.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hermod::nats::NatsConfig;

pub const USER: &str = "hermod";
pub const PASSWORD: &str = "a-test-password";

/// A `nats-server` with user/password auth on a free loopback port; killed on drop.
pub struct Nats {
    child: Child,
    port: u16,
    conf: PathBuf,
}

pub fn nats_server_bin() -> PathBuf {
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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nats {
    /// A server with user/password authentication.
    pub fn start(dir: &Path) -> Nats {
        let auth = format!("authorization {{ user: {USER}, password: \"{PASSWORD}\" }}");
        Nats::alone(dir, "nats.conf", &auth)
    }

    /// A server that admits only the user holding the nkey whose public key is `public`.
    pub fn start_nkey(dir: &Path, public: &str) -> Nats {
        let auth = format!("authorization {{ users: [ {{ nkey: {public} }} ] }}");
        Nats::alone(dir, "nats-nkey.conf", &auth)
    }

    /// One server on a free port, configured by `file` in `dir` with this `authorization`.
    fn alone(dir: &Path, file: &str, authorization: &str) -> Nats {
        let port = free_port();
        let conf = dir.join(file);
        std::fs::write(
            &conf,
            format!("listen: 127.0.0.1:{port}\n{authorization}\n"),
        )
        .unwrap();
        Nats::run(conf, port)
    }

    /// Three servers routed to each other (explicit routes, as docs/cluster.md shows).
    pub fn cluster(dir: &Path) -> Vec<Nats> {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
            .collect();
        ports
            .iter()
            .enumerate()
            .map(|(i, (port, cport))| {
                let conf = dir.join(format!("nats-{i}.conf"));
                let text = format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{port}\n\
                     authorization {{ user: {USER}, password: \"{PASSWORD}\" }}\n\
                     cluster {{\n  name: hermod-test\n  listen: 127.0.0.1:{cport}\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                );
                std::fs::write(&conf, text).unwrap();
                Nats::run(conf, *port)
            })
            .collect()
    }

    pub fn run(conf: PathBuf, port: u16) -> Nats {
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

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn config(&self, name: &str, password: &str) -> NatsConfig {
        NatsConfig {
            urls: vec![self.url()],
            user: Some(USER.into()),
            password: Some(password.into()),
            nkey_seed: None,
            tls: false,
            tls_ca: None,
            tls_client: None,
            name: name.into(),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// kill -9, then the same server again on the same port.
    pub fn restart(self) -> Nats {
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
