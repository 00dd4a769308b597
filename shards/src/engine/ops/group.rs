//! `group_*` requests, from the member's side: each is checked for shape here (names,
//! usernames, roles) and run by the group's owner shard (`engine/group.rs`), which holds the
//! membership and roles and answers.

use rand::Rng;

use super::super::Shard;
use super::{bad, conv_arg, resolve, resolve_one, Asker, Outcome};
use crate::ids::{ConvId, GroupId, UserId};
use crate::limits::GROUP_NAME_BYTES_MAX;
use crate::mail::ConvOp;
use crate::protocol as p;
use crate::storage::Storage;

/// A group name, trimmed: 1 to `GROUP_NAME_BYTES_MAX` bytes.
pub(in crate::engine) fn group_name(
    name: &str,
) -> Result<String, (crate::protocol::ErrorCode, String)> {
    let name = name.trim();
    if name.is_empty() || name.len() > GROUP_NAME_BYTES_MAX {
        return Err(bad(format!(
            "name must be 1 to {GROUP_NAME_BYTES_MAX} bytes"
        )));
    }
    Ok(name.to_owned())
}

impl<S: Storage> Shard<S> {
    /// The id is drawn here, by the creator's home shard; the group's owner is wherever it lands.
    pub(in crate::engine) fn create_group(&mut self, by: Asker, req: p::GroupCreate) -> Outcome {
        let name = group_name(&req.name)?;
        let members = resolve(&req.members)?;
        let conv = ConvId::Group(GroupId(self.rng.gen_range(1..=u64::MAX)));
        let op = ConvOp::GroupCreate {
            name,
            members,
            approval: req.approval,
            history_visible: req.history_visible,
        };
        self.mail_owner(by, conv, op)
    }

    /// A channel: created like a group whose members are its publishers (docs/channels.md).
    pub(in crate::engine) fn create_channel(
        &mut self,
        by: Asker,
        req: p::ChannelCreate,
    ) -> Outcome {
        let name = group_name(&req.name)?;
        let members = resolve(&req.publishers)?;
        let conv = ConvId::Channel(GroupId(self.rng.gen_range(1..=u64::MAX)));
        let op = ConvOp::GroupCreate {
            name,
            members,
            approval: false,
            history_visible: true,
        };
        self.mail_owner(by, conv, op)
    }

    pub(in crate::engine) fn group_invite(&mut self, by: Asker, req: p::GroupUsers) -> Outcome {
        let users = resolve(&req.users)?;
        let conv = conv_arg(&req.conv)?;
        self.mail_owner(by, conv, ConvOp::Invite { users })
    }

    /// `group_join`, `group_leave`, `group_disband`: the group is all they name.
    pub(in crate::engine) fn group_plain(
        &mut self,
        by: Asker,
        req: p::ConvOnly,
        op: ConvOp,
    ) -> Outcome {
        let conv = conv_arg(&req.conv)?;
        self.mail_owner(by, conv, op)
    }

    /// `group_kick`, `group_approve`, `group_decline`, `group_transfer`: one member, required.
    pub(in crate::engine) fn group_on_member(
        &mut self,
        by: Asker,
        req: p::GroupUser,
        op: impl FnOnce(UserId) -> ConvOp,
    ) -> Outcome {
        let conv = conv_arg(&req.conv)?;
        let user = resolve_one(req.user.as_ref())?;
        self.mail_owner(by, conv, op(user))
    }

    pub(in crate::engine) fn group_role(&mut self, by: Asker, req: p::GroupUser) -> Outcome {
        let conv = conv_arg(&req.conv)?;
        let user = resolve_one(req.user.as_ref())?;
        let admin = match req.role.as_deref() {
            Some("admin") => true,
            Some("member") => false,
            _ => return Err(bad("role is \"admin\" or \"member\"".into())),
        };
        self.mail_owner(by, conv, ConvOp::Role { user, admin })
    }

    /// No `user`: the whole group.
    pub(in crate::engine) fn group_mute(&mut self, by: Asker, req: p::GroupUser) -> Outcome {
        let conv = conv_arg(&req.conv)?;
        let user = match &req.user {
            Some(_) => Some(resolve_one(req.user.as_ref())?),
            None => None,
        };
        let op = ConvOp::Mute {
            user,
            muted: req.muted.unwrap_or(true),
        };
        self.mail_owner(by, conv, op)
    }

    pub(in crate::engine) fn group_update(&mut self, by: Asker, req: p::GroupUpdate) -> Outcome {
        let name = req.name.as_deref().map(group_name).transpose()?;
        let op = ConvOp::Update {
            name,
            approval: req.approval,
            history_visible: req.history_visible,
        };
        let conv = conv_arg(&req.conv)?;
        self.mail_owner(by, conv, op)
    }

    /// `group_info`, `group_members`: answered without a body if `version` is current.
    pub(in crate::engine) fn group_query(
        &mut self,
        by: Asker,
        req: p::Versioned,
        op: impl FnOnce(Option<u64>) -> ConvOp,
    ) -> Outcome {
        let conv = conv_arg(&req.conv)?;
        self.mail_owner(by, conv, op(req.version))
    }
}
