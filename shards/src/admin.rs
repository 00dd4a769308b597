//! The operator's API (`/admin/…` over HTTP): what each request means, parsed from its method,
//! path and JSON body into one [`AdminOp`], and how its answer maps onto an HTTP status.
//!
//! The driver authenticates the operator (a bearer token from the server's configuration,
//! never a user's device token) before anything here runs; the engine carries the operations
//! out on the shards that own the state (`engine/admin.rs`). See `docs/admin.md`.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth;
use crate::ids::ConvId;
use crate::limits::{ADMIN_CREATE_MAX, DEVICE_BYTES_MAX};
use crate::mail::BotAction;
use crate::protocol::ErrorCode;

/// One operator request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminOp {
    /// `GET /admin/stats`: answered by the driver from the metrics board.
    Stats,
    /// `POST /admin/users`: create these accounts (username as given, password).
    CreateUsers { users: Vec<(String, String)> },
    /// `GET /admin/users/{name}`: the account, whether it is disabled, its devices.
    ViewUser { user: String },
    /// `POST /admin/users/{name}/disable` and `…/enable`.
    SetDisabled { user: String, disabled: bool },
    /// `POST /admin/users/{name}/kick`: close one device's connections (or every device's when
    /// `device` is `None`) and revoke its token.
    Kick {
        user: String,
        device: Option<String>,
    },
    /// `POST /admin/notice`: a message from the server (`hermod`) to a user or into a group.
    Notice { to: NoticeTo, body: String },
    /// `POST /admin/bots` (create, owned by the operator), `POST /admin/bots/{name}/token`,
    /// `…/revoke`, `…/webhook`: any bot, whoever owns it.
    Bot { name: String, action: BotAction },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoticeTo {
    /// `id`, when the operator gives one, makes a retry of the same notice answer with the
    /// original (the message path's dedup); without it every request is a new notice.
    User {
        name: String,
        id: Option<uuid::Uuid>,
    },
    Group(ConvId),
}

/// A refused request: the error code (its HTTP status follows from it) and why.
pub type Refusal = (ErrorCode, String);

impl AdminOp {
    /// A one-line description for logs: never a password or a notice body.
    pub fn summary(&self) -> String {
        match self {
            AdminOp::Stats => "stats".into(),
            AdminOp::ViewUser { user } => format!("view {user}"),
            AdminOp::CreateUsers { users } => format!("create {} users", users.len()),
            AdminOp::SetDisabled { user, disabled } => {
                format!("{} {user}", if *disabled { "disable" } else { "enable" })
            }
            AdminOp::Kick { user, device } => {
                format!("kick {user}/{}", device.as_deref().unwrap_or("*"))
            }
            AdminOp::Notice { to, body } => format!("notice to {to:?} ({} bytes)", body.len()),
            AdminOp::Bot { name, action } => {
                let what = match action {
                    BotAction::Create { .. } => "create",
                    BotAction::Token => "new token for",
                    BotAction::Revoke => "revoke",
                    BotAction::Webhook(_) => "set the webhook of",
                };
                format!("{what} bot {name}")
            }
        }
    }

    /// Parses one request. `body_bytes_max` bounds a notice's body like a message's.
    pub fn parse(
        method: &str,
        path: &str,
        body: &[u8],
        body_bytes_max: usize,
    ) -> Result<AdminOp, Refusal> {
        let rest = path
            .strip_prefix("/admin/")
            .ok_or_else(|| not_found(path))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match (method, parts.as_slice()) {
            ("GET", ["stats"]) => Ok(AdminOp::Stats),
            ("GET", ["users", user]) => Ok(AdminOp::ViewUser {
                user: user.to_string(),
            }),
            ("POST", ["users"]) => {
                #[derive(Deserialize)]
                struct Create {
                    users: Vec<NewUser>,
                }
                #[derive(Deserialize)]
                struct NewUser {
                    username: String,
                    password: String,
                }
                let req: Create = json(body)?;
                if req.users.is_empty() || req.users.len() > ADMIN_CREATE_MAX {
                    return Err(bad(format!(
                        "name 1 to {ADMIN_CREATE_MAX} users per request"
                    )));
                }
                let users = req
                    .users
                    .into_iter()
                    .map(|u| (u.username, u.password))
                    .collect();
                Ok(AdminOp::CreateUsers { users })
            }
            ("POST", ["users", user, action @ ("disable" | "enable")]) => {
                Ok(AdminOp::SetDisabled {
                    user: user.to_string(),
                    disabled: *action == "disable",
                })
            }
            ("POST", ["users", user, "kick"]) => {
                #[derive(Deserialize, Default)]
                struct Kick {
                    device: Option<String>,
                }
                let req: Kick = if body.iter().all(u8::is_ascii_whitespace) {
                    Kick::default()
                } else {
                    json(body)?
                };
                if let Some(d) = &req.device {
                    if auth::check_device(d).is_err() {
                        return Err(bad(format!(
                            "device names are 1-{DEVICE_BYTES_MAX} printable characters"
                        )));
                    }
                }
                Ok(AdminOp::Kick {
                    user: user.to_string(),
                    device: req.device,
                })
            }
            ("POST", ["notice"]) => {
                #[derive(Deserialize)]
                struct Notice<'a> {
                    user: Option<String>,
                    group: Option<String>,
                    id: Option<uuid::Uuid>,
                    #[serde(borrow)]
                    body: &'a RawValue,
                }
                let text = std::str::from_utf8(body)
                    .map_err(|_| (ErrorCode::BadJson, "the body is not UTF-8".to_owned()))?;
                let req: Notice = serde_json::from_str(text).map_err(json_refusal)?;
                let raw = req.body.get();
                crate::protocol::check_body(raw, body_bytes_max)?;
                let to = match (req.user, req.group) {
                    (Some(name), None) => NoticeTo::User { name, id: req.id },
                    (None, Some(_)) if req.id.is_some() => {
                        return Err(bad("`id` applies to notices to a user".into()))
                    }
                    (None, Some(group)) => match ConvId::parse(&group) {
                        Some(conv) if conv.is_group() => NoticeTo::Group(conv),
                        _ => return Err(bad(format!("{group:?} is not a group id (g.<hex>)"))),
                    },
                    _ => return Err(bad("name exactly one of `user` and `group`".into())),
                };
                Ok(AdminOp::Notice {
                    to,
                    body: raw.to_owned(),
                })
            }
            ("POST", ["bots"]) => {
                #[derive(Deserialize)]
                struct Create {
                    name: String,
                    webhook: Option<String>,
                }
                let req: Create = json(body)?;
                Ok(AdminOp::Bot {
                    name: req.name,
                    action: BotAction::Create {
                        webhook: req.webhook,
                    },
                })
            }
            ("POST", ["bots", name, action @ ("token" | "revoke")]) => Ok(AdminOp::Bot {
                name: name.to_string(),
                action: if *action == "token" {
                    BotAction::Token
                } else {
                    BotAction::Revoke
                },
            }),
            ("POST", ["bots", name, "webhook"]) => {
                #[derive(Deserialize)]
                struct Webhook {
                    webhook: Option<String>,
                }
                let req: Webhook = json(body)?;
                Ok(AdminOp::Bot {
                    name: name.to_string(),
                    action: BotAction::Webhook(req.webhook),
                })
            }
            (
                _,
                ["bots"]
                | ["bots", _, "token" | "revoke" | "webhook"]
                | ["stats"]
                | ["users"]
                | ["users", _]
                | ["users", _, "disable" | "enable" | "kick"]
                | ["notice"],
            ) => Err((
                ErrorCode::BadRequest,
                format!("{method} is not allowed on {path}"),
            )),
            _ => Err(not_found(path)),
        }
    }
}

/// The HTTP status of an admin answer: 200 for `ok`, else by error code.
pub fn status_of(code: Option<ErrorCode>) -> u16 {
    match code {
        None => 200,
        Some(ErrorCode::UnknownOp) => 404,
        Some(ErrorCode::NoSuchUser | ErrorCode::NoSuchConversation | ErrorCode::NoSuchDevice) => {
            404
        }
        Some(ErrorCode::UsernameTaken | ErrorCode::GroupDisbanded) => 409,
        // Only the bots' HTTP API meets these.
        Some(
            ErrorCode::BadCredentials
            | ErrorCode::BadToken
            | ErrorCode::DeviceRevoked
            | ErrorCode::TokenExpired,
        ) => 401,
        Some(ErrorCode::Forbidden | ErrorCode::AccountDisabled | ErrorCode::NotMember) => 403,
        Some(ErrorCode::RateLimited) => 429,
        Some(ErrorCode::Overloaded | ErrorCode::Unavailable) => 503,
        Some(ErrorCode::Internal) => 500,
        Some(_) => 400,
    }
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(json_refusal)
}

fn json_refusal(e: serde_json::Error) -> Refusal {
    let code = if e.is_syntax() || e.is_eof() {
        ErrorCode::BadJson
    } else {
        ErrorCode::BadRequest
    };
    (code, e.to_string())
}

fn bad(message: String) -> Refusal {
    (ErrorCode::BadRequest, message)
}

fn not_found(path: &str) -> Refusal {
    (
        ErrorCode::UnknownOp,
        format!("no admin operation at {path}; see docs/admin.md"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(method: &str, path: &str, body: &str) -> Result<AdminOp, Refusal> {
        AdminOp::parse(method, path, body.as_bytes(), 100)
    }

    #[test]
    fn every_operation_parses() {
        assert_eq!(parse("GET", "/admin/stats", ""), Ok(AdminOp::Stats));
        assert_eq!(
            parse("GET", "/admin/users/bob", ""),
            Ok(AdminOp::ViewUser { user: "bob".into() })
        );
        assert_eq!(
            parse(
                "POST",
                "/admin/users",
                r#"{"users":[{"username":"a1","password":"p"}]}"#
            ),
            Ok(AdminOp::CreateUsers {
                users: vec![("a1".into(), "p".into())]
            })
        );
        assert_eq!(
            parse("POST", "/admin/users/bob/disable", ""),
            Ok(AdminOp::SetDisabled {
                user: "bob".into(),
                disabled: true
            })
        );
        assert_eq!(
            parse("POST", "/admin/users/bob/enable", ""),
            Ok(AdminOp::SetDisabled {
                user: "bob".into(),
                disabled: false
            })
        );
        assert_eq!(
            parse("POST", "/admin/users/bob/kick", ""),
            Ok(AdminOp::Kick {
                user: "bob".into(),
                device: None
            })
        );
        assert_eq!(
            parse("POST", "/admin/users/bob/kick", r#"{"device":"pc"}"#),
            Ok(AdminOp::Kick {
                user: "bob".into(),
                device: Some("pc".into())
            })
        );
        assert_eq!(
            parse(
                "POST",
                "/admin/notice",
                r#"{"user":"bob","body":{"text":"hi"}}"#
            ),
            Ok(AdminOp::Notice {
                to: NoticeTo::User {
                    name: "bob".into(),
                    id: None
                },
                body: r#"{"text":"hi"}"#.into()
            })
        );
        assert_eq!(
            parse("POST", "/admin/notice", r#"{"group":"g.1f","body":1}"#),
            Ok(AdminOp::Notice {
                to: NoticeTo::Group(ConvId::parse("g.1f").unwrap()),
                body: "1".into()
            })
        );
    }

    #[test]
    fn bad_requests_are_refused_with_a_code() {
        let code = |m, p, b| parse(m, p, b).unwrap_err().0;
        assert_eq!(code("GET", "/admin/nope", ""), ErrorCode::UnknownOp);
        assert_eq!(code("GET", "/admin/users", ""), ErrorCode::BadRequest);
        assert_eq!(code("POST", "/admin/users", "{"), ErrorCode::BadJson);
        assert_eq!(
            code("POST", "/admin/users", r#"{"users":[]}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code("POST", "/admin/users", r#"{"users":[{"username":1}]}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code("POST", "/admin/notice", r#"{"body":1}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(
                "POST",
                "/admin/notice",
                r#"{"user":"a","group":"g.1","body":1}"#
            ),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(
                "POST",
                "/admin/notice",
                r#"{"group":"g.1","id":"0190b2a4-8c6e-7d3e-9b1a-2f4c6d8e0a1b","body":1}"#
            ),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(
                "POST",
                "/admin/notice",
                r#"{"user":"a","id":"nope","body":1}"#
            ),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code("POST", "/admin/notice", r#"{"group":"d.1.2","body":1}"#),
            ErrorCode::BadRequest
        );
        let big = format!(r#"{{"user":"a","body":"{}"}}"#, "x".repeat(200));
        assert_eq!(code("POST", "/admin/notice", &big), ErrorCode::BodyTooLarge);
        assert_eq!(
            code("POST", "/admin/users/bob/kick", r#"{"device":""}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(status_of(Some(ErrorCode::NoSuchUser)), 404);
        assert_eq!(status_of(Some(ErrorCode::BadJson)), 400);
        assert_eq!(status_of(None), 200);
    }
}
