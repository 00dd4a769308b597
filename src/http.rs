//! The HTTP/1.1 in front of the WebSocket: `GET /` serves the web chat page, `GET /ws`
//! upgrades, `GET /hermod.js` and `/hermod.d.ts` serve the client library, `GET /metrics`, `/healthz` and `/readyz` report on the server, `/admin/…` is the
//! operator's API (`docs/admin.md`), `POST /bot/api` the bots' (`docs/bots.md`), anything else gets 404 (405 for other methods). Requests
//! are parsed with `httparse`; one request per connection (`Connection: close`) except the
//! upgrade.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Largest request head accepted (request line, headers, the blank line); beyond it: 431 and
/// close, whether the head is still incomplete or arrived whole in one read.
pub const HEAD_BYTES_MAX: usize = 8 * 1024;
/// Most header lines in a request head; more: 431 and close.
pub const HEADERS_MAX: usize = 32;

const INDEX_HTML: &str = include_str!("web/index.html");
/// The client library (docs/client.md) and its TypeScript declarations, served beside the page
/// that is built on it.
const HERMOD_JS: &str = include_str!("web/hermod.js");
const HERMOD_DTS: &str = include_str!("web/hermod.d.ts");
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What to do with a request head.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Write this response and close.
    Respond(Vec<u8>),
    /// Write this `101` response and speak WebSocket; the head used `head_len` bytes.
    Upgrade { response: Vec<u8>, head_len: usize },
    /// `GET /metrics`, `/healthz`, `/readyz`: answered from the shared metrics board.
    Status(StatusPage),
    /// `/admin/…`: read `body_len` more bytes after the head, then authenticate and run it.
    Admin(AdminRequest),
    /// `POST /bot/api`: a bot's request frame, `body_len` bytes after the head; the engine
    /// checks the bearer token.
    Bot(AdminRequest),
    /// `/media/…` (docs/media.md): read `body_len` more bytes, then `media::serve`.
    Media(crate::media::MediaRequest),
}

#[derive(Debug, PartialEq, Eq)]
pub struct AdminRequest {
    pub method: String,
    pub path: String,
    /// The token of an `Authorization: Bearer …` header.
    pub bearer: Option<String>,
    pub head_len: usize,
    pub body_len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusPage {
    Metrics,
    Health,
    Ready,
}

/// The response to a status page, given the board.
pub fn status(page: StatusPage, board: &crate::metrics::Board) -> Vec<u8> {
    match page {
        StatusPage::Metrics => response(
            200,
            "OK",
            "text/plain; version=0.0.4; charset=utf-8",
            board.render().as_bytes(),
        ),
        // The process answers HTTP: it is alive.
        StatusPage::Health => simple(200, "OK", "ok\n"),
        StatusPage::Ready if board.ready() => match board.links_up() {
            (_, 0) => simple(200, "OK", "ready\n"),
            // Ready to serve this node's users whatever the links: a peer node being down
            // must not take this one out of its balancer. The links are shown, not judged.
            (up, all) => simple(200, "OK", &format!("ready\nlinks up {up}/{all}\n")),
        },
        StatusPage::Ready => simple(503, "Service Unavailable", "not ready\n"),
    }
}

/// Parses the request head at the front of `buf`. `None`: incomplete, read more.
pub fn route(buf: &[u8]) -> Option<Route> {
    let too_large = || {
        Some(Route::Respond(simple(
            431,
            "Request Header Fields Too Large",
            "request head over 8 KiB or 32 header lines\n",
        )))
    };
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= HEAD_BYTES_MAX => n,
        Ok(httparse::Status::Partial) if buf.len() < HEAD_BYTES_MAX => return None,
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return too_large(),
        Err(_) => {
            return Some(Route::Respond(simple(
                400,
                "Bad Request",
                "malformed HTTP request\n",
            )))
        }
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let path = req.path.unwrap_or("/").split('?').next().unwrap_or("/");
    if path == "/bot/api" {
        if req.method != Some("POST") {
            return Some(Route::Respond(simple(
                405,
                "Method Not Allowed",
                "only POST\n",
            )));
        }
        let route = admin_route(
            "POST",
            path,
            head_len,
            [
                header("content-length"),
                header("transfer-encoding"),
                header("authorization"),
            ],
        );
        return Some(match route {
            Route::Admin(req) if req.body_len > hermod_shards::limits::FRAME_BYTES_MAX => {
                Route::Respond(simple(
                    413,
                    "Payload Too Large",
                    "a bot request is one frame (at most 64 KiB)\n",
                ))
            }
            Route::Admin(req) => Route::Bot(req),
            other => other,
        });
    }
    if path.starts_with("/media/") {
        return Some(media_route(
            req.method.unwrap_or("GET"),
            req.path.unwrap_or("/"),
            head_len,
            &header,
        ));
    }
    if path.starts_with("/admin/") {
        return Some(admin_route(
            req.method.unwrap_or("GET"),
            path,
            head_len,
            [
                header("content-length"),
                header("transfer-encoding"),
                header("authorization"),
            ],
        ));
    }
    if req.method != Some("GET") {
        return Some(Route::Respond(simple(
            405,
            "Method Not Allowed",
            "only GET\n",
        )));
    }
    match path {
        "/" | "/index.html" => Some(Route::Respond(response(
            200,
            "OK",
            "text/html; charset=utf-8",
            INDEX_HTML.as_bytes(),
        ))),
        "/hermod.js" => Some(Route::Respond(library(
            "text/javascript; charset=utf-8",
            HERMOD_JS,
        ))),
        "/hermod.d.ts" => Some(Route::Respond(library(
            "application/typescript; charset=utf-8",
            HERMOD_DTS,
        ))),
        "/metrics" => Some(Route::Status(StatusPage::Metrics)),
        "/healthz" => Some(Route::Status(StatusPage::Health)),
        "/readyz" => Some(Route::Status(StatusPage::Ready)),
        "/ws" => {
            let upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
            let connection = header("connection").is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            });
            let version = header("sec-websocket-version") == Some("13");
            match header("sec-websocket-key") {
                Some(key) if upgrade && connection && version => {
                    let response = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                        accept_key(key)
                    );
                    Some(Route::Upgrade {
                        response: response.into_bytes(),
                        head_len,
                    })
                }
                _ => Some(Route::Respond(simple(
                    400,
                    "Bad Request",
                    "expected a WebSocket upgrade (version 13)\n",
                ))),
            }
        }
        _ => Some(Route::Respond(simple(404, "Not Found", "not found\n"))),
    }
}

/// Headers every media response carries: any origin may upload and read (access is by grant,
/// upload id and capability, never by cookie), and see the headers a resumable upload needs.
const MEDIA_CORS: &str = "Access-Control-Allow-Origin: *\r\nAccess-Control-Expose-Headers: Upload-Offset, Upload-Length, Content-Range, ETag\r\n";

/// `/media/…`: methods, body length, and the headers its handlers read.
fn media_route<'h>(
    method: &str,
    target: &str,
    head_len: usize,
    header: &dyn Fn(&str) -> Option<&'h str>,
) -> Route {
    if method == "OPTIONS" {
        let preflight = format!(
            "HTTP/1.1 204 No Content\r\n{MEDIA_CORS}Access-Control-Allow-Methods: GET, HEAD, POST, PATCH, DELETE\r\nAccess-Control-Allow-Headers: Upload-Offset, Content-Type, Range, If-None-Match\r\nAccess-Control-Max-Age: 86400\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return Route::Respond(preflight.into_bytes());
    }
    if !matches!(method, "GET" | "HEAD" | "POST" | "PATCH" | "DELETE") {
        return Route::Respond(simple(
            405,
            "Method Not Allowed",
            "GET, HEAD, POST, PATCH or DELETE\n",
        ));
    }
    if header("transfer-encoding").is_some() {
        return Route::Respond(simple(
            411,
            "Length Required",
            "send the body with Content-Length\n",
        ));
    }
    let body_len = match header("content-length").map(|v| v.trim().parse::<usize>()) {
        None => 0,
        Some(Ok(n)) if n <= crate::media::CHUNK_BYTES_LIMIT => n,
        Some(Ok(_)) => {
            return Route::Respond(simple(
                413,
                "Payload Too Large",
                "media chunks are at most chunk_max bytes\n",
            ))
        }
        Some(Err(_)) => return Route::Respond(simple(400, "Bad Request", "bad Content-Length\n")),
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Route::Media(crate::media::MediaRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        head_len,
        body_len,
        upload_offset: header("upload-offset").map(str::to_owned),
        range: header("range").map(str::to_owned),
        if_none_match: header("if-none-match").map(str::to_owned),
    })
}

/// A response head with `headers`, a body of `len` bytes to follow, and the media CORS
/// headers; the connection closes after it.
pub fn head(status: u16, headers: &[(&str, String)], len: u64) -> String {
    use std::fmt::Write as _;
    let mut out = format!("HTTP/1.1 {status} {}\r\n{MEDIA_CORS}", reason(status));
    for (name, value) in headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    if status != 204 && status != 304 {
        let _ = write!(out, "Content-Length: {len}\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// `/admin/…`, given the Content-Length, Transfer-Encoding and Authorization headers.
fn admin_route(
    method: &str,
    path: &str,
    head_len: usize,
    [content_length, transfer_encoding, authorization]: [Option<&str>; 3],
) -> Route {
    use hermod_shards::limits::ADMIN_BODY_BYTES_MAX;
    if !matches!(method, "GET" | "POST") {
        return Route::Respond(simple(405, "Method Not Allowed", "GET or POST\n"));
    }
    if transfer_encoding.is_some() {
        return Route::Respond(simple(
            411,
            "Length Required",
            "send the body with Content-Length\n",
        ));
    }
    let body_len = match content_length.map(|v| v.trim().parse::<usize>()) {
        None => 0,
        Some(Ok(n)) if n <= ADMIN_BODY_BYTES_MAX => n,
        Some(Ok(_)) => {
            return Route::Respond(simple(
                413,
                "Payload Too Large",
                "admin request bodies are at most 512 KiB\n",
            ))
        }
        Some(Err(_)) => return Route::Respond(simple(400, "Bad Request", "bad Content-Length\n")),
    };
    let bearer = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    Route::Admin(AdminRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        bearer,
        head_len,
        body_len,
    })
}

/// The reason phrase of the statuses this server answers with (clients read the code).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        416 => "Range Not Satisfiable",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// A JSON response (the admin API's answers).
pub fn json(status: u16, body: &str) -> Vec<u8> {
    let mut out = response(status, reason(status), "application/json", body.as_bytes());
    if status == 401 {
        // RFC 6750: say which scheme is expected. Inserted before the blank line.
        let at = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response has a head");
        out.splice(at + 2..at + 2, *b"WWW-Authenticate: Bearer\r\n");
    }
    out
}

pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(WS_GUID.as_bytes());
    STANDARD.encode(sha.finalize())
}

fn simple(status: u16, reason: &str, body: &str) -> Vec<u8> {
    response(status, reason, "text/plain; charset=utf-8", body.as_bytes())
}

fn response(status: u16, reason: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The client library: readable from any origin (a module script is fetched with CORS, and an
/// app's page is rarely served by Hermod itself); revalidated, not re-downloaded, per use.
fn library(content_type: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nAccess-Control-Allow-Origin: *\r\nCache-Control: no-cache\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// The status of a response this module wrote (`Respond`), for counting refusals.
pub fn response_status(response: &[u8]) -> Option<u16> {
    std::str::from_utf8(response.get(9..12)?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(route: &Option<Route>) -> Option<u16> {
        match route {
            Some(Route::Respond(r)) => response_status(r),
            Some(Route::Status(_)) => Some(200),
            _ => None,
        }
    }

    #[test]
    fn rfc_6455_accept_key_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn routes() {
        assert_eq!(route(b"GET / HTTP/1.1\r\nHost: x"), None);
        let Some(Route::Respond(r)) = route(b"GET / HTTP/1.1\r\n\r\n") else {
            panic!()
        };
        assert!(r.starts_with(b"HTTP/1.1 200"));
        let Some(Route::Respond(r)) = route(b"GET /nope HTTP/1.1\r\n\r\n") else {
            panic!()
        };
        assert!(r.starts_with(b"HTTP/1.1 404"));
        for path in ["/hermod.js", "/hermod.d.ts"] {
            let req = format!("GET {path} HTTP/1.1\r\n\r\n");
            let Some(Route::Respond(r)) = route(req.as_bytes()) else {
                panic!("{path}")
            };
            let text = String::from_utf8_lossy(&r);
            assert!(text.starts_with("HTTP/1.1 200"), "{path}");
            assert!(
                text.contains("Access-Control-Allow-Origin: *"),
                "any origin may import it"
            );
            assert!(text.contains("export class Hermod"), "{path}");
        }
        let Some(Route::Respond(r)) =
            route(b"POST /bot/api HTTP/1.1\r\nContent-Length: 70000\r\n\r\n")
        else {
            panic!()
        };
        assert!(r.starts_with(b"HTTP/1.1 413"), "a bot request is one frame");
        let Some(Route::Respond(r)) = route(b"GET /bot/api HTTP/1.1\r\n\r\n") else {
            panic!()
        };
        assert!(r.starts_with(b"HTTP/1.1 405"));
        for (path, page) in [
            ("/metrics", StatusPage::Metrics),
            ("/healthz", StatusPage::Health),
            ("/readyz?x=1", StatusPage::Ready),
        ] {
            let req = format!("GET {path} HTTP/1.1\r\n\r\n");
            assert_eq!(route(req.as_bytes()), Some(Route::Status(page)));
        }
        let Some(Route::Respond(r)) = route(b"GET /ws HTTP/1.1\r\n\r\n") else {
            panic!()
        };
        assert!(r.starts_with(b"HTTP/1.1 400"));
        let up = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nXY";
        let Some(Route::Upgrade { response, head_len }) = route(up) else {
            panic!()
        };
        assert_eq!(
            head_len,
            up.len() - 2,
            "bytes after the head stay for the WebSocket"
        );
        assert!(String::from_utf8(response)
            .unwrap()
            .contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        let Some(Route::Respond(r)) = route(&[b'G'; HEAD_BYTES_MAX + 1]) else {
            panic!()
        };
        assert!(r.starts_with(b"HTTP/1.1 4"));
        // A complete head over the limit, arriving in one read, is refused too.
        let big = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(HEAD_BYTES_MAX)
        );
        assert_eq!(status_of(&route(big.as_bytes())), Some(431));
        let fits = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(HEAD_BYTES_MAX - 23)
        );
        assert_eq!(fits.len(), HEAD_BYTES_MAX);
        assert_eq!(status_of(&route(fits.as_bytes())), Some(200));
        let lines = |n: usize| format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(n));
        assert_eq!(status_of(&route(lines(HEADERS_MAX).as_bytes())), Some(200));
        assert_eq!(
            status_of(&route(lines(HEADERS_MAX + 1).as_bytes())),
            Some(431)
        );
    }

    #[test]
    fn admin_routes() {
        let req = b"POST /admin/users HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nContent-Length: 5\r\n\r\n{\"a\":";
        let Some(Route::Admin(a)) = route(req) else {
            panic!()
        };
        assert_eq!(
            a,
            AdminRequest {
                method: "POST".into(),
                path: "/admin/users".into(),
                bearer: Some("s3cret".into()),
                head_len: req.len() - 5,
                body_len: 5,
            }
        );
        let status = |req: &[u8]| match route(req) {
            Some(Route::Respond(r)) => String::from_utf8(r).unwrap()[9..12].to_owned(),
            other => panic!("{other:?}"),
        };
        assert_eq!(status(b"DELETE /admin/users HTTP/1.1\r\n\r\n"), "405");
        assert_eq!(
            status(b"POST /admin/users HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            "413"
        );
        assert_eq!(
            status(b"POST /admin/users HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "411"
        );
        let r = String::from_utf8(json(401, "{}")).unwrap();
        assert!(r.contains("\r\nWWW-Authenticate: Bearer\r\n\r\n{}"), "{r}");
    }
}
