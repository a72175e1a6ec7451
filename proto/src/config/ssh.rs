//! `master.ssh`: how the master reaches the hosts it starts servers on (OpenSSH, as Pomelo did).
//!
//! ```yaml
//! master:
//!   ssh:
//!     user: pomelo                  # default: ssh's own (the master's user, or ~/.ssh/config)
//!     identity: /etc/pomelo/id_ed25519
//!     options: [StrictHostKeyChecking=yes, ConnectTimeout=5]   # each passed as `-o KEY=VALUE`
//!     bin: /usr/local/bin/pomelo-rs # the binary on the remote host (default `pomelo-rs` on its PATH)
//!     dir: /srv/pomelo              # its working directory there (default: the login directory)
//!     hosts:
//!       10.0.0.2: { user: chat, dir: /srv/chat }   # per-host overrides of the keys above
//! ```
//!
//! `BatchMode=yes` is always passed: the master never waits on a password prompt. Values are checked
//! here (plain names, no leading `-`, no whitespace or control characters in what reaches the remote
//! shell), so nothing from the file can become an ssh option or a second remote command. Pure; no I/O.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use super::locate::Seg;
use super::walk::{child, item, Ctx};

/// Settings for one host (or the defaults for all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshTarget {
    pub user: Option<String>,
    pub identity: Option<PathBuf>,
    /// `KEY=VALUE` strings, each passed as `-o KEY=VALUE` (a host's options come after the defaults).
    pub options: Vec<String>,
    pub bin: Option<String>,
    pub dir: Option<String>,
}

/// The `master.ssh` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshConfig {
    pub defaults: SshTarget,
    pub hosts: BTreeMap<String, SshTarget>,
}

impl SshConfig {
    /// The settings for `host`: its overrides on top of the defaults.
    pub fn for_host(&self, host: &str) -> SshTarget {
        let mut t = self.defaults.clone();
        if let Some(h) = self.hosts.get(host) {
            if h.user.is_some() {
                t.user.clone_from(&h.user);
            }
            if h.identity.is_some() {
                t.identity.clone_from(&h.identity);
            }
            if h.bin.is_some() {
                t.bin.clone_from(&h.bin);
            }
            if h.dir.is_some() {
                t.dir.clone_from(&h.dir);
            }
            t.options.extend(h.options.iter().cloned());
        }
        t
    }
}

const TARGET_KEYS: &[&str] = &["user", "identity", "options", "bin", "dir"];
const SSH_KEYS: &[&str] = &["user", "identity", "options", "bin", "dir", "hosts"];

/// Reads `master.ssh` into `cfg`, reporting every problem.
pub(super) fn apply_ssh(ctx: &mut Ctx, cfg: &mut SshConfig, value: &Value, path: &[Seg]) {
    for (key, v) in ctx.entries(value, path, SSH_KEYS) {
        let p = child(path, &key);
        if key == "hosts" {
            let Some(map) = ctx.mapping(v, &p) else { continue };
            for (k, hv) in map {
                let host = match k {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
                };
                let hp = child(&p, &host);
                if !plain(&host) {
                    ctx.err(&hp, format!("`{host}` is not a host name or address"));
                    continue;
                }
                let mut t = SshTarget::default();
                for (hk, hv) in ctx.entries(hv, &hp, TARGET_KEYS) {
                    target_key(ctx, &mut t, &hk, hv, &child(&hp, &hk));
                }
                cfg.hosts.insert(host, t);
            }
        } else {
            target_key(ctx, &mut cfg.defaults, &key, v, &p);
        }
    }
}

fn target_key(ctx: &mut Ctx, t: &mut SshTarget, key: &str, v: &Value, p: &[Seg]) {
    match key {
        "user" => {
            if let Some(s) = ctx.string(v, p) {
                if plain(&s) {
                    t.user = Some(s);
                } else {
                    ctx.err(p, format!("`{s}` is not a user name: use A-Z a-z 0-9 . _ - (not first)"));
                }
            }
        }
        "identity" => {
            if let Some(s) = ctx.string(v, p) {
                if s.is_empty() || s.starts_with('-') || s.chars().any(char::is_control) {
                    ctx.err(p, format!("`{s}` is not a key file path"));
                } else {
                    t.identity = Some(PathBuf::from(s));
                }
            }
        }
        "options" => {
            let items: Vec<&Value> = match v {
                Value::Sequence(items) => items.iter().collect(),
                other => vec![other],
            };
            for (i, o) in items.into_iter().enumerate() {
                let ip = if matches!(v, Value::Sequence(_)) { item(p, i) } else { p.to_vec() };
                let Some(s) = ctx.string(o, &ip) else { continue };
                match s.split_once('=') {
                    Some((k, val))
                        if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric()) && shell_safe(val) =>
                    {
                        t.options.push(s)
                    }
                    _ => ctx.err(&ip, format!("`{s}` is not an ssh option: write KEY=VALUE, e.g. `ConnectTimeout=5`")),
                }
            }
        }
        "bin" | "dir" => {
            if let Some(s) = ctx.string(v, p) {
                if s.is_empty() || s.starts_with('-') || !shell_safe(&s) {
                    ctx.err(p, format!("`{s}` is not a path: no whitespace, quotes or control characters"));
                } else if key == "bin" {
                    t.bin = Some(s);
                } else {
                    t.dir = Some(s);
                }
            }
        }
        _ => {}
    }
}

/// A name that cannot be read as an option or split by a shell.
fn plain(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('-') && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
}

/// Reaches the remote shell unchanged inside single quotes, and splits nowhere.
fn shell_safe(s: &str) -> bool {
    !s.chars().any(|c| c.is_whitespace() || c.is_control() || "'\"`$\\;&|<>".contains(c))
}
