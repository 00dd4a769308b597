//! A real `nats-server` (Debian's, installed by scripts/nats-deps.sh) on loopback, with
//! user/password authentication: one server or a three-server cluster with explicit routes.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hermod::nats::NatsConfig;

pub const USER: &str = "hermod";
pub const PASSWORD: &str = "a-test-password";
/// Starts tried with fresh ports before a test gives up.
const ATTEMPTS: usize = 5;

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

/// `prefix-<pid>-<n>`, unique among the tests of this run.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
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
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let conf = dir.join(file);
            std::fs::write(
                &conf,
                format!("listen: 127.0.0.1:{port}\n{authorization}\n"),
            )
            .unwrap();
            if let Some(nats) = Nats::try_run(conf, port) {
                return nats;
            }
        }
        panic!("nats-server did not start in {ATTEMPTS} attempts");
    }

    /// One server requiring TLS with a client certificate signed by `tls`'s CA (and the
    /// password, as every other here).
    pub fn start_tls(dir: &Path, tls: &Tls) -> Nats {
        let auth = format!(
            "authorization {{ user: {USER}, password: \"{PASSWORD}\" }}\n{}",
            tls.server_block()
        );
        Nats::alone(dir, "nats-tls.conf", &auth)
    }

    /// Three servers routed to each other (explicit routes, as docs/cluster.md shows).
    pub fn cluster(dir: &Path) -> Vec<Nats> {
        Nats::cluster_with(dir, None)
    }

    /// `cluster`, its client port requiring TLS with client certificates when `tls` is given
    /// (the routes between the servers stay plain: loopback).
    pub fn cluster_with(dir: &Path, tls: Option<&Tls>) -> Vec<Nats> {
        // A name of its own: tests run in parallel and pick free ports independently, so a
        // route may name another test's cluster port; NATS joins only clusters of one name.
        let name = unique_name("hermod-test");
        for _ in 0..ATTEMPTS {
            let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
            let routes: Vec<String> = ports
                .iter()
                .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
                .collect();
            let servers: Option<Vec<Nats>> = ports
                .iter()
                .enumerate()
                .map(|(i, (port, cport))| {
                    let conf = dir.join(format!("nats-{i}.conf"));
                    let text = format!(
                        "server_name: n{i}\nlisten: 127.0.0.1:{port}\n\
                         authorization {{ user: {USER}, password: \"{PASSWORD}\" }}\n{}\n\
                         cluster {{\n  name: {name}\n  listen: 127.0.0.1:{cport}\n  routes: [{}]\n}}\n",
                        tls.map(Tls::server_block).unwrap_or_default(),
                        routes.join(", ")
                    );
                    std::fs::write(&conf, text).unwrap();
                    Nats::try_run(conf, *port)
                })
                .collect();
            if let Some(servers) = servers {
                return servers;
            }
        }
        panic!("a nats-server cluster did not start in {ATTEMPTS} attempts");
    }

    /// Starts `nats-server -c conf` and waits for it to listen on `port`.
    pub fn run(conf: PathBuf, port: u16) -> Nats {
        Nats::try_run(conf, port).expect("nats-server starts and listens")
    }

    /// `run`, or `None` if the server exited first: a port picked free was taken meanwhile
    /// (tests run in parallel, and outgoing connections draw from the same ports).
    fn try_run(conf: PathBuf, port: u16) -> Option<Nats> {
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        // Killed on drop if it does not come up.
        let mut nats = Nats { child, port, conf };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if nats.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            // Listening is not enough: the port picked free may have been taken by another
            // test's listener, and then this server exits on its failed bind while that one
            // answers. Wait for a NATS greeting, and for this server to still be running.
            if greets_as_nats(addr) {
                std::thread::sleep(Duration::from_millis(50));
                if nats.child.try_wait().ok().flatten().is_none() {
                    return Some(nats);
                }
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// A test CA, a server certificate for 127.0.0.1 and a client certificate it signed, as PEM
/// files in a directory (generated with rcgen, so no `openssl` is needed).
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Tls {
    pub fn generate(dir: &Path) -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let signed = |names: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = signed(vec!["127.0.0.1".into(), "localhost".into()]);
        let (client_cert, client_key) = signed(vec!["hermod-node".into()]);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Tls {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
        }
    }

    /// nats-server's `tls` block: this certificate, and client certificates required.
    fn server_block(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}",
            self.server_cert, self.server_key, self.ca
        )
    }

    /// `[cluster.nats]` lines of a Hermod config file that use it.
    pub fn config_lines(&self) -> String {
        format!(
            "tls = true\ntls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
            self.ca, self.client_cert, self.client_key
        )
    }
}

/// Something on `addr` sends a NATS server's `INFO` greeting.
fn greets_as_nats(addr: SocketAddr) -> bool {
    use std::io::Read;
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).is_ok() && &head == b"INFO"
}
