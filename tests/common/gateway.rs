//! A real HTTP receiver standing in for an operator's push gateway (or a bot's endpoint):
//! a loopback listener, a thread per connection, HTTP/1.1 keep-alive, each request's body
//! recorded with whether its `X-Hermod-Signature` is right. It can answer 200, answer 500, or
//! hang (read the request, never answer) to play a gateway that is down in the worst way.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Ok = 0,
    Fail = 1,
    Hang = 2,
}

/// One request as received.
#[derive(Debug)]
pub struct Hit {
    pub path: String,
    pub body: Value,
    /// `X-Hermod-Signature` matches `secret` over `X-Hermod-Timestamp` and the body.
    pub signed: bool,
}

pub struct Gateway {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    secret: Arc<RwLock<String>>,
    hits: Receiver<Hit>,
}

impl Gateway {
    pub fn start(secret: &str, mode: Mode) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the gateway");
        let addr = listener.local_addr().expect("its address");
        let mode = Arc::new(AtomicU8::new(mode as u8));
        let secret = Arc::new(RwLock::new(secret.to_owned()));
        let (tx, hits) = channel();
        let (m, key) = (mode.clone(), secret.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (tx, m, key) = (tx.clone(), m.clone(), key.clone());
                std::thread::spawn(move || serve(stream, &key, &m, &tx));
            }
        });
        Gateway {
            addr,
            mode,
            secret,
            hits,
        }
    }

    /// The key signatures are checked with from now on (a bot's, known once it exists).
    pub fn set_secret(&self, secret: &[u8]) {
        *self.secret.write().unwrap() = String::from_utf8_lossy(secret).into_owned();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Every request arriving within `wait`.
    pub fn hits_within(&self, wait: Duration) -> Vec<Hit> {
        let end = Instant::now() + wait;
        let mut out = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.hits.recv_timeout(left) {
                Ok(hit) => out.push(hit),
                Err(_) => break,
            }
        }
        out
    }

    /// The next request, waiting up to `wait`.
    pub fn next_hit(&self, wait: Duration) -> Option<Hit> {
        self.hits.recv_timeout(wait).ok()
    }
}

fn serve(stream: TcpStream, secret: &RwLock<String>, mode: &AtomicU8, tx: &Sender<Hit>) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let (mut length, mut ts, mut signature) = (0usize, String::new(), String::new());
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "x-hermod-timestamp" => ts = value.to_owned(),
                "x-hermod-signature" => signature = value.to_owned(),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        let signed = ts.parse().is_ok_and(|ts| {
            let secret = secret.read().unwrap();
            hermod::webhook::sign(secret.as_bytes(), ts, &text) == signature
        });
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        let _ = tx.send(Hit { path, body, signed });
        let answer = match mode.load(Ordering::SeqCst) {
            0 => "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            1 => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
            _ => {
                // Hang: hold the connection open, answer nothing, until the client gives up.
                let mut sink = [0u8; 1024];
                while reader.get_mut().read(&mut sink).unwrap_or(0) > 0 {}
                return;
            }
        };
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}
