//! `hermod-tools admin`: a client of a running server's admin API (`docs/admin.md`).
//!
//! Every call is one HTTP request with the operator's bearer token; the answer is the server's
//! JSON (`{"ok": …}` or `{"error": {code, message}}`). A refusal is an error carrying the
//! server's code and message, so scripts can stop on the first one.

use std::time::Duration;

use anyhow::{bail, Context};
use hermod_shards::limits::ADMIN_CREATE_MAX;
use serde_json::{json, Value};

/// Bulk creation hashes every password at full cost on the server: allow for it.
const TIMEOUT: Duration = Duration::from_secs(330);

pub struct Client {
    /// `http://host:port`, without a trailing slash.
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            agent: ureq::AgentBuilder::new().timeout(TIMEOUT).build(),
        }
    }

    /// `GET /admin/stats`.
    pub fn stats(&self) -> anyhow::Result<Value> {
        self.call("GET", "stats", None)
    }

    /// `POST /admin/users`, in requests of at most `ADMIN_CREATE_MAX` users; the answers'
    /// `created` and `failed` lists are concatenated.
    pub fn create_users(&self, users: &[(String, String)]) -> anyhow::Result<Value> {
        let (mut created, mut failed) = (Vec::new(), Vec::new());
        for chunk in users.chunks(ADMIN_CREATE_MAX) {
            let list: Vec<Value> = chunk
                .iter()
                .map(|(u, p)| json!({ "username": u, "password": p }))
                .collect();
            let ok = self.call("POST", "users", Some(json!({ "users": list })))?;
            created.extend(ok["created"].as_array().cloned().unwrap_or_default());
            failed.extend(ok["failed"].as_array().cloned().unwrap_or_default());
        }
        Ok(json!({ "created": created, "failed": failed }))
    }

    /// `GET /admin/users/{user}`: created, disabled, devices.
    pub fn user(&self, user: &str) -> anyhow::Result<Value> {
        self.call("GET", &format!("users/{user}"), None)
    }

    pub fn set_disabled(&self, user: &str, disabled: bool) -> anyhow::Result<Value> {
        let action = if disabled { "disable" } else { "enable" };
        self.call("POST", &format!("users/{user}/{action}"), None)
    }

    pub fn kick(&self, user: &str, device: Option<&str>) -> anyhow::Result<Value> {
        let body = device.map(|d| json!({ "device": d }));
        self.call("POST", &format!("users/{user}/kick"), body)
    }

    /// A notice to `user` or into `group` (exactly one of them). `id` (user notices) makes a
    /// retry answer with the original instead of sending a second notice.
    pub fn notice(
        &self,
        user: Option<&str>,
        group: Option<&str>,
        id: Option<&str>,
        body: Value,
    ) -> anyhow::Result<Value> {
        let mut req = json!({ "body": body });
        if let Some(id) = id {
            req["id"] = json!(id);
        }
        match (user, group) {
            (Some(u), None) => req["user"] = json!(u),
            (None, Some(g)) => req["group"] = json!(g),
            _ => bail!("name exactly one of --user and --group"),
        }
        self.call("POST", "notice", Some(req))
    }

    /// `POST /admin/bots`: a bot owned by no user; the answer holds its token and secret.
    pub fn create_bot(&self, name: &str, webhook: Option<&str>) -> anyhow::Result<Value> {
        self.call(
            "POST",
            "bots",
            Some(json!({ "name": name, "webhook": webhook })),
        )
    }

    /// `POST /admin/bots/{name}/token` or `…/revoke`.
    pub fn bot_token(&self, name: &str, revoke: bool) -> anyhow::Result<Value> {
        let action = if revoke { "revoke" } else { "token" };
        self.call("POST", &format!("bots/{name}/{action}"), None)
    }

    /// `POST /admin/bots/{name}/webhook`: set, or clear with `None`.
    pub fn bot_webhook(&self, name: &str, webhook: Option<&str>) -> anyhow::Result<Value> {
        self.call(
            "POST",
            &format!("bots/{name}/webhook"),
            Some(json!({ "webhook": webhook })),
        )
    }

    /// One request; the `ok` value, or an error with the server's code and message.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}/admin/{path}", self.base);
        let req = self
            .agent
            .request(method, &url)
            .set("Authorization", &format!("Bearer {}", self.token));
        let result = match body {
            Some(body) => req.send_json(body),
            None if method == "POST" => req.send_string(""),
            None => req.call(),
        };
        let (status, answer) = match result {
            Ok(resp) => (resp.status(), resp.into_string()),
            Err(ureq::Error::Status(status, resp)) => (status, resp.into_string()),
            Err(e) => return Err(e).with_context(|| format!("{method} {url}")),
        };
        let answer = answer.with_context(|| format!("reading the answer of {method} {url}"))?;
        let value: Value = serde_json::from_str(&answer)
            .with_context(|| format!("{method} {url}: HTTP {status}, not JSON: {answer}"))?;
        if let Some(err) = value.get("error") {
            bail!(
                "{method} {url}: HTTP {status}: {} ({})",
                err["message"].as_str().unwrap_or("?"),
                err["code"].as_str().unwrap_or("?")
            );
        }
        Ok(value["ok"].clone())
    }
}

/// `username<TAB>password` lines (blank lines and `#` comments skipped).
pub fn parse_users(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            let (u, p) = l
                .split_once('\t')
                .with_context(|| format!("line {}: expected username<TAB>password", i + 1))?;
            Ok((u.trim().to_owned(), p.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_files_parse() {
        let users = parse_users("# accounts\nalice\tpassword1\n\nbob\tp w d\n").unwrap();
        assert_eq!(
            users,
            vec![
                ("alice".into(), "password1".into()),
                ("bob".into(), "p w d".into())
            ]
        );
        assert!(parse_users("alice password").is_err());
    }
}
