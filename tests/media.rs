//! The media path (docs/media.md) against the real server binary: grants over the WebSocket,
//! chunked uploads over HTTP that resume after a dropped connection and after `kill -9`,
//! deduplication that needs a proof of possession, hash checks, range reads behind capability
//! URLs, quotas, expiry, and the collection of abandoned uploads.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Client, Server};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// An HTTP response: status, headers (lower-case names), body.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let text = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Resp {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn grant(c: &mut Client, content: &[u8], mime: &str) -> Value {
    c.ok(
        "media_upload",
        json!({ "size": content.len(), "type": mime, "sha256": sha(content) }),
    )
}

fn create(addr: SocketAddr, grant: &Value) -> Value {
    let r = http(
        addr,
        "POST",
        "/media/uploads",
        &[],
        json!({ "grant": grant["grant"] }).to_string().as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn patch(addr: SocketAddr, upload: &str, offset: usize, bytes: &[u8]) -> Resp {
    let offset = offset.to_string();
    http(
        addr,
        "PATCH",
        &format!("/media/uploads/{upload}"),
        &[("Upload-Offset", &offset)],
        bytes,
    )
}

fn complete(addr: SocketAddr, upload: &str, body: Value) -> Resp {
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    http(
        addr,
        "POST",
        &format!("/media/uploads/{upload}/complete"),
        &[],
        &body,
    )
}

fn offset_of(addr: SocketAddr, upload: &str) -> Option<u64> {
    let r = http(addr, "HEAD", &format!("/media/uploads/{upload}"), &[], b"");
    (r.status == 204).then(|| r.header("upload-offset").unwrap().parse().unwrap())
}

/// Uploads `content` whole (chunks of 64 KiB) and completes it: the completion's answer.
fn upload(addr: SocketAddr, c: &mut Client, content: &[u8], mime: &str) -> Value {
    let up = create(addr, &grant(c, content, mime));
    let id = up["upload"].as_str().unwrap().to_owned();
    for (i, chunk) in content.chunks(64 * 1024).enumerate() {
        assert_eq!(patch(addr, &id, i * 64 * 1024, chunk).status, 204);
    }
    let done = complete(addr, &id, Value::Null);
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    done.json()
}

fn config(dir: &std::path::Path, media: &str) -> String {
    let path = dir.join("media.toml");
    std::fs::write(&path, format!("[media]\n{media}")).unwrap();
    path.display().to_string()
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn uploads_resume_deduplicate_with_a_proof_and_read_by_range() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "bytes_max = 400000\nquota_bytes = 1000000\n");
    let server = Server::start(&["--config", &cfg]);
    let addr = server.addr;
    let (mut alice, _) = server.user("alice", "phone");
    let (mut bob, _) = server.user("bob", "phone");
    let photo = content(300_000, 7);

    // A grant, then the upload in chunks; a connection dropped mid-chunk stores nothing of it.
    let g = grant(&mut alice, &photo, "image/png");
    assert_eq!(g["quota_used"], 300_000);
    let up = create(addr, &g);
    let id = up["upload"].as_str().unwrap().to_owned();
    assert_eq!(up["offset"], 0);
    let r = patch(addr, &id, 0, &photo[..100_000]);
    assert_eq!((r.status, r.header("upload-offset")), (204, Some("100000")));
    let mut cut = TcpStream::connect(addr).unwrap();
    write!(cut, "PATCH /media/uploads/{id} HTTP/1.1\r\nUpload-Offset: 100000\r\nContent-Length: 100000\r\n\r\n").unwrap();
    cut.write_all(&photo[100_000..150_000]).unwrap();
    drop(cut);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        offset_of(addr, &id),
        Some(100_000),
        "the cut chunk left nothing"
    );
    let stale = patch(addr, &id, 0, &photo[..10]);
    assert_eq!(
        (stale.status, stale.header("upload-offset")),
        (409, Some("100000"))
    );
    let early = complete(addr, &id, Value::Null);
    assert_eq!(early.status, 409, "not all there yet");
    assert_eq!(
        patch(addr, &id, 100_000, &photo[100_000..250_000]).status,
        204
    );
    assert_eq!(patch(addr, &id, 250_000, &photo[250_000..]).status, 204);
    let over = patch(addr, &id, 300_000, b"more");
    assert_eq!(over.status, 413, "past the announced size");
    let done = complete(addr, &id, Value::Null);
    assert_eq!(done.status, 200);
    let done = done.json();
    assert_eq!(
        (done["dedup"].as_bool(), done["size"].as_u64()),
        (Some(false), Some(300_000))
    );
    let url = done["url"].as_str().unwrap().to_owned();

    // Reads: whole, by range, cached, refused without a genuine capability.
    let whole = http(addr, "GET", &url, &[], b"");
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, photo);
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert_eq!(whole.header("content-type"), Some("image/png"));
    let etag = whole.header("etag").unwrap().to_owned();
    assert!(whole.header("cache-control").unwrap().contains("max-age="));
    let part = http(addr, "GET", &url, &[("Range", "bytes=1000-1999")], b"");
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some("bytes 1000-1999/300000"));
    assert_eq!(part.body, &photo[1000..2000]);
    let tail = http(addr, "GET", &url, &[("Range", "bytes=-10")], b"");
    assert_eq!(tail.body, &photo[299_990..]);
    let past = http(addr, "GET", &url, &[("Range", "bytes=300000-")], b"");
    assert_eq!(
        (past.status, past.header("content-range")),
        (416, Some("bytes */300000"))
    );
    let cached = http(addr, "GET", &url, &[("If-None-Match", &etag)], b"");
    assert_eq!((cached.status, cached.body.len()), (304, 0));
    let media = done["media"].as_str().unwrap();
    let forged = format!("/media/{media}?e=99999999999&s=AAAA.BBBB");
    assert_eq!(http(addr, "GET", &forged, &[], b"").status, 403);
    assert_eq!(
        http(addr, "GET", &format!("/media/{media}"), &[], b"").status,
        403
    );
    let other = format!(
        "/media/{}?{}",
        "0".repeat(32),
        url.split('?').nth(1).unwrap()
    );
    assert_eq!(
        http(addr, "GET", &other, &[], b"").status,
        403,
        "a URL reads its own medium only"
    );

    // The same bytes from bob: a deduplication, completed only with a proof of possession.
    let dup = create(addr, &grant(&mut bob, &photo, "image/png"));
    assert_eq!(dup["dedup"], true);
    let dup_id = dup["upload"].as_str().unwrap();
    assert_eq!(
        complete(addr, dup_id, Value::Null).status,
        400,
        "a proof is required"
    );
    let wrong = complete(addr, dup_id, json!({ "proof": sha(b"guess") }));
    assert_eq!(wrong.status, 403);
    let dup = create(addr, &grant(&mut bob, &photo, "image/png"));
    // proof = SHA-256(nonce ‖ content), with this upload's own nonce.
    let mut proved = dup["nonce"].as_str().unwrap().as_bytes().to_vec();
    proved.extend_from_slice(&photo);
    let ok = complete(
        addr,
        dup["upload"].as_str().unwrap(),
        json!({ "proof": sha(&proved) }),
    );
    assert_eq!(ok.status, 200);
    let ok = ok.json();
    assert_eq!(ok["dedup"], true);
    assert_ne!(
        ok["media"], done["media"],
        "a medium of its own, the same content"
    );
    assert_eq!(
        http(addr, "GET", ok["url"].as_str().unwrap(), &[], b"").body,
        photo
    );

    // A hash other than the granted one is refused and the upload discarded.
    let text = content(1000, 1);
    let mut lie = grant(&mut alice, &text, "text/plain");
    lie["grant"] = grant(&mut alice, &content(1000, 2), "text/plain")["grant"].clone();
    let up = create(addr, &lie);
    let up_id = up["upload"].as_str().unwrap();
    assert_eq!(patch(addr, up_id, 0, &text).status, 204);
    let refused = complete(addr, up_id, Value::Null);
    assert_eq!(refused.status, 422);
    assert_eq!(offset_of(addr, up_id), None, "discarded");

    // A file type is served as an attachment, never as a page of this origin.
    let doc = upload(addr, &mut alice, b"<script>alert(1)</script>", "text/html");
    let got = http(addr, "GET", doc["url"].as_str().unwrap(), &[], b"");
    assert_eq!(got.header("content-disposition"), Some("attachment"));
    assert!(got
        .header("content-security-policy")
        .unwrap()
        .contains("sandbox"));

    // Quotas and limits: alice has used 300,000 + 1,000 + 1,000 + 25 of 1,000,000.
    let big = alice.err(
        "media_upload",
        json!({ "size": 400_001, "type": "video/mp4", "sha256": sha(b"x") }),
    );
    assert_eq!(big, "bad_request", "over bytes_max");
    alice.ok(
        "media_upload",
        json!({ "size": 400_000, "type": "video/mp4", "sha256": sha(b"y") }),
    );
    let over = alice.err(
        "media_upload",
        json!({ "size": 400_000, "type": "video/mp4", "sha256": sha(b"z") }),
    );
    assert_eq!(over, "limit_reached");
    assert_eq!(
        alice.err(
            "media_upload",
            json!({ "size": 10, "type": "nonsense", "sha256": sha(b"z") })
        ),
        "bad_request"
    );
    let forged_grant = http(
        addr,
        "POST",
        "/media/uploads",
        &[],
        br#"{"grant":"AAAA.BBBB"}"#,
    );
    assert_eq!(forged_grant.status, 403);

    let page = common::http_get(addr, "/metrics");
    assert_eq!(metric_sum_plain(&page, "hermod_media_dedup_total"), 1);
    assert_eq!(
        metric_sum_plain(&page, "hermod_media_uploads_refused_total"),
        2
    );
    assert!(metric_sum_plain(&page, "hermod_media_bytes_out_total") >= 600_000);

    // What `hermod-tools inspect` shows of the store: two contents (the photo, the script),
    // three media (the photo twice), and the uploads granted but never created or finished.
    let store = hermod_tools::inspect::media(&server.data.join("media")).unwrap();
    assert_eq!((store.blobs.count, store.media), (2, 3));
    assert_eq!(store.blobs.bytes, 300_000 + 25);

    // Deleting the first photo over raw HTTP: the preflight allows DELETE; no grant, a forged
    // one and bob's are refused; alice's works once; the URL then reads 404.
    let medium = done["media"].as_str().unwrap().to_owned();
    let path = format!("/media/{medium}");
    let preflight = http(addr, "OPTIONS", &path, &[], b"");
    assert!(preflight
        .header("access-control-allow-methods")
        .is_some_and(|m| m.contains("DELETE")));
    assert_eq!(http(addr, "DELETE", &path, &[], b"").status, 400);
    assert_eq!(
        http(addr, "DELETE", &path, &[], br#"{"grant":"AAAA.BBBB"}"#).status,
        403
    );
    let theirs = bob.ok("media_delete", json!({ "media": medium }))["grant"].clone();
    let refused = http(
        addr,
        "DELETE",
        &path,
        &[],
        json!({ "grant": theirs }).to_string().as_bytes(),
    );
    assert_eq!(
        (refused.status, refused.json()["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let mine = alice.ok("media_delete", json!({ "media": medium }))["grant"].clone();
    let body = json!({ "grant": mine }).to_string();
    assert_eq!(
        http(addr, "DELETE", &path, &[], body.as_bytes()).status,
        204
    );
    assert_eq!(
        http(addr, "DELETE", &path, &[], body.as_bytes()).status,
        404,
        "once"
    );
    assert_eq!(http(addr, "GET", &url, &[], b"").status, 404);
    let page = common::http_get(addr, "/metrics");
    assert_eq!(metric_sum_plain(&page, "hermod_media_deleted_total"), 1);
}

/// A process-wide (unlabelled) sample: the media families have no shard label.
fn metric_sum_plain(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_crash_mid_upload_resumes_and_abandoned_uploads_and_expired_media_are_collected() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "bytes_max = 300000\nquota_bytes = 400000\nurl_ttl_s = 2\nupload_ttl_s = 4\ngc_interval_s = 1\n",
    );
    let mut server = Server::start(&["--config", &cfg]);
    let (mut alice, _) = server.user("alice", "phone");
    let video = content(250_000, 3);
    let up = create(server.addr, &grant(&mut alice, &video, "video/mp4"));
    let id = up["upload"].as_str().unwrap().to_owned();
    assert_eq!(patch(server.addr, &id, 0, &video[..120_000]).status, 204);

    // kill -9 mid-upload: what was acknowledged is there after the restart, and no more.
    drop(alice);
    server.kill9();
    let data = server.data.clone();
    let server = Server::start_on(&data, &["--config", &cfg]);
    let addr = server.addr;
    assert_eq!(offset_of(addr, &id), Some(120_000));
    assert_eq!(patch(addr, &id, 120_000, &video[120_000..]).status, 204);
    let done = complete(addr, &id, Value::Null);
    assert_eq!(done.status, 200);
    let url = done.json()["url"].as_str().unwrap().to_owned();
    assert_eq!(
        http(addr, "GET", &url, &[], b"").body,
        video,
        "no corrupt media"
    );

    // The quota holds 400,000: the 250,000 above plus an abandoned 100,000 leave no room for
    // another 100,000 until the abandoned upload is collected (upload_ttl_s 4, every second).
    let (mut alice, _) = server.user("alice", "phone");
    let left = content(100_000, 9);
    let abandoned = create(addr, &grant(&mut alice, &left, "image/jpeg"));
    let abandoned = abandoned["upload"].as_str().unwrap().to_owned();
    let more = json!({ "size": 100_000, "type": "image/jpeg", "sha256": sha(b"more") });
    assert_eq!(alice.err("media_upload", more.clone()), "limit_reached");
    std::thread::sleep(Duration::from_millis(5_500));
    assert_eq!(offset_of(addr, &abandoned), None, "collected");
    alice.ok("media_upload", more);
    let page = common::http_get(addr, "/metrics");
    assert!(metric_sum_plain(&page, "hermod_media_collected_total") >= 1);

    // The URL has expired meanwhile (url_ttl_s 2), and with it the medium: nobody can read it
    // any more, so it was collected with its content, and its size went back to the quota.
    let expired = http(addr, "GET", &url, &[], b"");
    assert_eq!(
        (expired.status, expired.json()["error"]["code"].as_str()),
        (403, Some("expired"))
    );
    assert_eq!(metric_sum_plain(&page, "hermod_media_expired_total"), 1);
    assert_eq!(metric_sum_plain(&page, "hermod_media_store_bytes"), 0);
    let store = hermod_tools::inspect::media(&data.join("media")).unwrap();
    assert_eq!((store.media, store.blobs.count), (0, 0));
    let g = alice.ok(
        "media_upload",
        json!({ "size": 250_000, "type": "video/mp4", "sha256": sha(b"v") }),
    );
    assert_eq!(
        g["quota_used"],
        100_000 + 250_000,
        "the `more` grant, and this one"
    );
}
