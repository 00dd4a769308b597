//! Test harness: starts the real `hermod` binary on port 0 with a temp data dir and talks to
//! it with a real WebSocket client (tungstenite) over real sockets.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

pub mod gateway;
pub mod nats;

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The admin address, when started with `--admin-listen`.
    pub admin_addr: Option<SocketAddr>,
    pub data: PathBuf,
    args: Vec<String>,
}

impl Server {
    /// Starts a server with cheap password hashing and 2 shards on a fresh data dir.
    pub fn start(extra: &[&str]) -> Server {
        let data = tempfile::Builder::new()
            .prefix("hermod-test-")
            .tempdir()
            .expect("tempdir")
            .keep();
        Server::start_on(&data, extra)
    }

    pub fn start_on(data: &Path, extra: &[&str]) -> Server {
        let listen = if extra.contains(&"--listen") {
            &[][..]
        } else {
            &["--listen", "127.0.0.1:0"][..]
        };
        let mut args: Vec<String> = ["serve"]
            .iter()
            .chain(listen)
            .chain(&["--argon2-memory-kib", "64", "--argon2-passes", "1"])
            .map(|s| s.to_string())
            .collect();
        args.push("--data".into());
        args.push(data.display().to_string());
        if !extra.contains(&"--shards") {
            args.extend(["--shards".to_string(), "2".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_hermod"))
            .args(&args)
            .env("HERMOD_LOG", "warn")
            .env_remove("HERMOD_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hermod");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        lines.read_line(&mut line).expect("read the listening line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from hermod: {line:?}"));
        let admin_addr = line
            .split("admin on http://")
            .nth(1)
            .and_then(|rest| rest.split(&[')', ' '][..]).next())
            .and_then(|a| a.parse().ok());
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = lines.read_to_string(&mut sink);
        });
        Server {
            child: Some(child),
            addr,
            admin_addr,
            data: data.to_path_buf(),
            args,
        }
    }

    /// SIGTERM, then wait for exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_timeout(&mut child, Duration::from_secs(20))
            .expect("server did not stop within 20 s of SIGTERM")
    }

    /// SIGKILL: the process dies mid-whatever it was doing.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// A registered, logged-in client.
    pub fn user(&self, name: &str, device: &str) -> (Client, String) {
        let mut c = self.client();
        let r = c.request(
            "register",
            json!({ "username": name, "password": "password123" }),
        );
        assert!(
            r.get("ok").is_some() || r["error"]["code"] == "username_taken",
            "register {name}: {r}"
        );
        let ok = c.ok(
            "login",
            json!({ "username": name, "password": "password123", "device": device }),
        );
        let token = ok["token"].as_str().expect("token").to_owned();
        (c, token)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub struct Client {
    pub ws: WebSocket<TcpStream>,
    pub rid: u64,
    pub pushes: VecDeque<Value>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let (ws, _) =
            tungstenite::client(format!("ws://{addr}/ws"), stream).expect("websocket handshake");
        Client {
            ws,
            rid: 0,
            pushes: VecDeque::new(),
        }
    }

    /// A client logged in as `user`/`device` on a socket with a 4 KiB receive buffer that the
    /// test then stops reading: the server's slow-consumer path.
    pub fn slow(addr: SocketAddr, user: &str, device: &str) -> Client {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&addr.into()).unwrap();
        let stream: TcpStream = socket.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client(format!("ws://{addr}/ws"), stream).unwrap();
        let mut c = Client {
            ws,
            rid: 0,
            pushes: VecDeque::new(),
        };
        c.ok(
            "login",
            json!({ "username": user, "password": "password123", "device": device }),
        );
        c
    }

    pub fn send_json(&mut self, v: &Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    /// Sends a request and returns its reply frame; pushes read meanwhile are queued.
    pub fn request(&mut self, op: &str, mut fields: Value) -> Value {
        self.rid += 1;
        let rid = self.rid;
        fields["op"] = json!(op);
        fields["rid"] = json!(rid);
        self.send_json(&fields);
        self.reply(rid)
    }

    pub fn reply(&mut self, rid: u64) -> Value {
        loop {
            let v = self
                .next_frame()
                .unwrap_or_else(|| panic!("connection closed while waiting for reply {rid}"));
            if v.get("push").is_some() {
                self.pushes.push_back(v);
            } else if v["rid"] == json!(rid) {
                return v;
            } else {
                panic!("unexpected frame while waiting for {rid}: {v}");
            }
        }
    }

    pub fn ok(&mut self, op: &str, fields: Value) -> Value {
        let r = self.request(op, fields);
        assert!(r.get("ok").is_some(), "{op} failed: {r}");
        r["ok"].clone()
    }

    /// The error code of a request expected to fail.
    pub fn err(&mut self, op: &str, fields: Value) -> String {
        let r = self.request(op, fields);
        r["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{op} should have failed: {r}"))
            .to_owned()
    }

    /// Next text frame as JSON; None once the connection is closed.
    pub fn next_frame(&mut self) -> Option<Value> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return Some(serde_json::from_str(&t).expect("server frames are JSON"))
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return None
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    panic!("no frame within {TIMEOUT:?}")
                }
                Err(_) => return None, // reset, or the server died
            }
        }
    }

    /// The next push, waiting up to `limit` in all (pings and pongs do not extend it).
    pub fn push_within(&mut self, limit: Duration) -> Option<Value> {
        if let Some(p) = self.pushes.pop_front() {
            return Some(p);
        }
        let deadline = std::time::Instant::now() + limit;
        let got = loop {
            let Some(left) = deadline
                .checked_duration_since(std::time::Instant::now())
                .filter(|d| !d.is_zero())
            else {
                break None;
            };
            self.ws.get_ref().set_read_timeout(Some(left)).unwrap();
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v.get("push").is_some() {
                        break Some(v);
                    }
                    panic!("unexpected reply while waiting for a push: {v}");
                }
                Ok(Message::Close(_)) => break None,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break None
                }
                Err(_) => break None,
            }
        };
        self.ws.get_ref().set_read_timeout(Some(TIMEOUT)).unwrap();
        got
    }

    /// The next push of `kind`, skipping others (acking skipped messages).
    pub fn next_push_of(&mut self, kind: &str) -> Value {
        loop {
            let p = self.push();
            if p["push"] == "msg" {
                self.ack(&p);
            }
            if p["push"] == kind {
                return p;
            }
        }
    }

    pub fn push(&mut self) -> Value {
        self.push_within(TIMEOUT)
            .expect("a push within the timeout")
    }

    /// Acks a `msg` push, and with it every earlier push of its conversation.
    pub fn ack(&mut self, push: &Value) {
        let conv = push["msg"]["conv"].as_str().expect("conv");
        let seq = push["msg"]["seq"].as_u64().expect("seq");
        self.send_json(&json!({ "op": "ack", "seqs": { conv: seq } }));
    }

    /// The close code among the raw bytes left on the socket, read without a WebSocket client:
    /// a client that never writes (no pongs) so the server's heartbeat timeout is what ends it.
    pub fn raw_close_code(&mut self) -> Option<u16> {
        use std::io::Read;
        let mut bytes = Vec::new();
        let _ = self.ws.get_mut().read_to_end(&mut bytes);
        let mut i = 0;
        while i + 2 <= bytes.len() {
            let opcode = bytes[i] & 0x0f;
            let (len, head) = match bytes[i + 1] & 0x7f {
                126 => (u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize, 4),
                127 => return None, // not sent by the server on these tests' paths
                n => (n as usize, 2),
            };
            let body = bytes.get(i + head..i + head + len)?;
            if opcode == 0x8 && body.len() >= 2 {
                return Some(u16::from_be_bytes([body[0], body[1]]));
            }
            i += head + len;
        }
        None
    }

    /// Reads until the server closes; returns the close code.
    pub fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// A raw HTTP request; returns the whole response text.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// One HTTP request with an optional bearer token and JSON body; returns the status and the
/// body parsed as JSON (`Value::Null` when it is not JSON).
pub fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    let json = out
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

/// The sum over shards of a `/metrics` family's samples whose labels contain `label`
/// (`""`: all of them), e.g. `metric_sum(page, "hermod_closes_total", "code=\"1002\"")`.
pub fn metric_sum(page: &str, name: &str, label: &str) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

// ---- requests and pushes every test file uses ----

/// Opens the one-to-one conversation with `peer`; its id.
pub fn open(c: &mut Client, peer: &str) -> String {
    c.ok("open", json!({ "user": peer }))["conv"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Sends `{"text": text}` to `conv`; the ack.
pub fn send(c: &mut Client, conv: &str, text: &str) -> Value {
    c.ok("send", json!({ "conv": conv, "body": { "text": text } }))
}

/// Creates a group; `extra` adds fields (`approval`, `history_visible`).
pub fn create(c: &mut Client, name: &str, members: &[&str], extra: Value) -> Value {
    let mut req = json!({ "name": name, "members": members });
    for (k, v) in extra.as_object().into_iter().flatten() {
        req[k] = v.clone();
    }
    c.ok("group_create", req)
}

/// `sync` of one conversation from its start (the whole reply, ok or error).
pub fn sync_all(c: &mut Client, conv: &str) -> Value {
    c.request("sync", json!({ "convs": [{ "conv": conv, "after": 0 }] }))
}

/// The next `msg` push (acked), skipping ephemeral pushes.
pub fn next_msg(c: &mut Client) -> Value {
    loop {
        let p = c.push();
        if p["push"] == "msg" {
            c.ack(&p);
            return p["msg"].clone();
        }
    }
}

/// No `msg` push arrives within `wait` (ephemeral pushes are ignored).
pub fn no_msg_within(c: &mut Client, wait: Duration) {
    while let Some(p) = c.push_within(wait) {
        assert_ne!(p["push"], "msg", "unexpected message: {p}");
    }
}

/// The seqs of a list of messages.
pub fn seqs(msgs: &Value) -> Vec<u64> {
    msgs.as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// A list of messages as `msg:<text>`, `system:<event>`, `recall`, `edit`.
pub fn events(msgs: &Value) -> Vec<String> {
    msgs.as_array()
        .unwrap()
        .iter()
        .map(|m| match m["kind"].as_str() {
            Some("system") => format!("system:{}", m["body"]["event"].as_str().unwrap()),
            Some(k) => k.to_owned(),
            None => format!("msg:{}", m["body"]["text"].as_str().unwrap_or("")),
        })
        .collect()
}
