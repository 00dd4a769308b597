//! `media`: uploads and downloads over the media path (docs/media.md) on loopback — MB/s each
//! way and the time per chunk — optionally paced (`--mb-per-s`) so a `direct` run beside it
//! measures what a steady upload costs the message path.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::RngCore;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::Target;
use crate::provision::users;
use crate::report::Report;
use crate::stats::{histogram, record, Summary};

#[derive(Clone, Debug, Serialize)]
pub struct MediaParams {
    pub target: Target,
    /// Bytes per medium.
    pub bytes: usize,
    /// Bytes per `PATCH`.
    pub chunk: usize,
    /// Media uploaded one after the other, each then read back whole.
    pub count: usize,
    /// Upload pace in MB/s (0: as fast as it goes).
    pub mb_per_s: f64,
    pub prefix: String,
}

/// One HTTP/1.1 request on a fresh connection (the server closes after each answer): status,
/// headers (lower-case names) and body length, with the body kept if `keep`.
async fn http(
    addr: &str,
    head: String,
    body: &[u8],
    keep: bool,
) -> anyhow::Result<(u16, Vec<(String, String)>, Vec<u8>, usize)> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut raw = Vec::new();
    let mut total = 0;
    let mut split = None;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n;
        if split.is_none() || keep {
            raw.extend_from_slice(&buf[..n]);
        }
        if split.is_none() {
            split = raw.windows(4).position(|w| w == b"\r\n\r\n");
        }
    }
    let split = split.context("no response head")?;
    let text = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.get(9..12))
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if keep {
        raw[split + 4..].to_vec()
    } else {
        Vec::new()
    };
    Ok((status, headers, body, total - split - 4))
}

pub async fn media(p: MediaParams) -> anyhow::Result<Report> {
    anyhow::ensure!(
        p.bytes > 0 && p.chunk > 0 && p.count > 0,
        "bytes, chunk and count must be positive"
    );
    let addr = p
        .target
        .url()
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .context("a ws:// URL")?
        .to_owned();
    let mut user = users(&p.target, &p.prefix, 1, 1)
        .await?
        .pop()
        .context("a user")?;
    let mut chunk_h = histogram();
    let (mut up_s, mut down_s) = (0.0, 0.0);
    let mut data = vec![0u8; p.bytes];
    for _ in 0..p.count {
        rand::thread_rng().fill_bytes(&mut data); // fresh content: no deduplication
        let sha = Sha256::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let grant = user
            .conn
            .ok(
                "media_upload",
                json!({ "size": p.bytes, "type": "video/mp4", "sha256": sha }),
            )
            .await?;
        let began = Instant::now();
        let body = json!({ "grant": grant["grant"] }).to_string();
        let head = format!(
            "POST /media/uploads HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let (status, _, created, _) = http(&addr, head, body.as_bytes(), true).await?;
        let created: Value = serde_json::from_slice(&created)?;
        if status != 201 {
            bail!("create: {status} {created}");
        }
        let id = created["upload"].as_str().context("upload id")?.to_owned();
        let mut offset = 0;
        while offset < p.bytes {
            let end = p.bytes.min(offset + p.chunk);
            let t = Instant::now();
            let head = format!(
                "PATCH /media/uploads/{id} HTTP/1.1\r\nUpload-Offset: {offset}\r\nContent-Length: {}\r\n\r\n",
                end - offset
            );
            let (status, _, _, _) = http(&addr, head, &data[offset..end], false).await?;
            if status != 204 {
                bail!("PATCH at {offset}: {status}");
            }
            record(&mut chunk_h, t.elapsed());
            offset = end;
            if p.mb_per_s > 0.0 {
                let due = began + Duration::from_secs_f64(offset as f64 / (p.mb_per_s * 1e6));
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let head =
            format!("POST /media/uploads/{id}/complete HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        let (status, _, done, _) = http(&addr, head, b"", true).await?;
        if status != 200 {
            bail!("complete: {status} {}", String::from_utf8_lossy(&done));
        }
        up_s += began.elapsed().as_secs_f64();
        let done: Value = serde_json::from_slice(&done)?;
        let url = done["url"].as_str().context("url")?;
        let began = Instant::now();
        let (status, _, _, len) =
            http(&addr, format!("GET {url} HTTP/1.1\r\n\r\n"), b"", false).await?;
        if status != 200 || len != p.bytes {
            bail!("download: {status}, {len} bytes");
        }
        down_s += began.elapsed().as_secs_f64();
    }
    let total_mb = (p.bytes * p.count) as f64 / 1e6;
    let figures = json!({
        "upload_mb_per_s": total_mb / up_s,
        "download_mb_per_s": total_mb / down_s,
        "chunk_latency": Summary::of(&chunk_h),
        "media": p.count,
        "bytes": p.bytes,
    });
    Report::new("media", &p, figures, &[("chunk_latency", &chunk_h)])
}
