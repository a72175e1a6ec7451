//! The document walk of `servers.yaml`: the root keys, the `master` and `servers` sections through the
//! [`schema`](super::schema) tables, every environment, then the cross-key [`rules`](super::rules), all
//! into one [`Ctx`] so that every problem is reported at once, each with its path and line.
//!
//! Each section is applied on top of defaults: `master` then `environments.<env>.master` (key by key);
//! `servers` is replaced as a whole by `environments.<env>.servers` when that is present. Every
//! environment is checked, not only the selected one, so a typo in `production` shows up in development.

use serde_yaml::Value;

use super::locate::{LineIndex, Seg};
use super::rules::{check_master, check_unique};
use super::schema::{apply_master, default_master, parse_servers, protobuf_paths, ENV_KEYS, ROOT_KEYS};
use super::walk::{child, Ctx};
use super::{ConfigError, MasterConfig, ProtobufTexts, ServerSpec, DEFAULT_ENV};

/// One environment: its name, effective master settings, where they came from, and its own servers.
type EnvSection = (String, MasterConfig, Vec<Seg>, Option<Vec<(ServerSpec, Vec<Seg>)>>);

/// Parses `text` for `env`; relative paths in it (the protos files) are read against `base`.
pub(super) fn parse(
    text: &str,
    env: &str,
    base: &std::path::Path,
) -> Result<(MasterConfig, Vec<ServerSpec>, Vec<std::path::PathBuf>), Vec<ConfigError>> {
    let mut ctx = Ctx { index: LineIndex::build(text), errors: Vec::new() };
    let doc: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Err(vec![ConfigError {
                line: e.location().map(|l| l.line()),
                path: String::new(),
                message: format!("not valid YAML: {e}"),
            }])
        }
    };
    if doc.is_null() {
        return Err(vec![ConfigError { line: None, path: String::new(), message: "the file is empty".into() }]);
    }
    let root = ctx.entries(&doc, &[], ROOT_KEYS);
    let get = |k: &str| root.iter().find(|(key, _)| key == k).map(|(_, v)| *v);

    let mpath = vec![Seg::Key("master".into())];
    let mut base_master = default_master();
    if let Some(m) = get("master") {
        apply_master(&mut ctx, &mut base_master, m, &mpath);
    }
    let ppath = vec![Seg::Key("protobuf".into())];
    let mut watched = Vec::new();
    let protobuf = get("protobuf").and_then(|v| read_protobuf(&mut ctx, v, &ppath, base, &mut watched));
    let dpath = vec![Seg::Key("dictionary".into())];
    let dictionary = get("dictionary").map(|v| read_dictionary(&mut ctx, v, &dpath)).unwrap_or_default();
    let spath = vec![Seg::Key("servers".into())];
    let base_servers = get("servers").map(|v| parse_servers(&mut ctx, v, &spath));

    // Every environment is checked; the selected one is kept.
    let mut envs: Vec<EnvSection> = Vec::new();
    let epath = vec![Seg::Key("environments".into())];
    if let Some(e) = get("environments") {
        if let Some(map) = ctx.mapping(e, &epath) {
            for (k, v) in map {
                let name = k.as_str().unwrap_or_default().to_string();
                let p = child(&epath, &name);
                let mut m = base_master.clone();
                let mut servers = None;
                let mut mp = mpath.clone();
                for (key, ev) in ctx.entries(v, &p, ENV_KEYS) {
                    let kp = child(&p, &key);
                    if key == "master" {
                        apply_master(&mut ctx, &mut m, ev, &kp);
                        mp = kp;
                    } else {
                        servers = Some(parse_servers(&mut ctx, ev, &kp));
                    }
                }
                envs.push((name, m, mp, servers));
            }
        }
    }
    let mut selected = None;
    if !envs.iter().any(|(n, ..)| n == DEFAULT_ENV) {
        envs.insert(0, (DEFAULT_ENV.to_string(), base_master.clone(), mpath.clone(), None));
    }
    for (name, master, mp, servers) in envs {
        let mut servers = servers.or_else(|| base_servers.clone()).unwrap_or_default();
        for (s, _) in &mut servers {
            s.external |= master.external_hosts.contains(&s.host);
            s.protobuf.clone_from(&protobuf);
            s.dictionary.clone_from(&dictionary);
        }
        check_master(&mut ctx, &master, &mp);
        check_unique(&mut ctx, &master, &servers, &mp);
        if name == env {
            selected = Some((master, servers.into_iter().map(|(s, _)| s).collect::<Vec<_>>()));
        }
    }
    if selected.is_none() {
        ctx.err(&epath, format!("environment `{env}` is not defined in `environments`"));
    }
    if base_servers.is_none() && ctx.errors.is_empty() {
        if let Some((_, servers)) = &selected {
            if servers.is_empty() {
                ctx.err(&[], "no `servers` section: list at least one server");
            }
        }
    }
    match selected {
        Some((master, servers)) if ctx.errors.is_empty() => Ok((master, servers, watched)),
        _ => {
            ctx.errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            Err(ctx.errors)
        }
    }
}

/// Reads and compiles the `protobuf` files: every gate, connector and chat server gets their texts (so
/// an edited file changes those servers' specs, and a reload restarts them with it). A missing, oversized
/// or invalid file is a problem at the key that names it.
fn read_protobuf(
    ctx: &mut Ctx,
    value: &Value,
    path: &[Seg],
    base: &std::path::Path,
    watched: &mut Vec<std::path::PathBuf>,
) -> Option<ProtobufTexts> {
    use crate::wire::protobuf::{ProtoBundle, Side, MAX_PROTOS_BYTES};
    let paths = protobuf_paths(ctx, value, path);
    if paths.server.is_none() && paths.client.is_none() {
        return None;
    }
    let mut read = |file: &Option<String>, key: &str| -> Result<Option<String>, ()> {
        let Some(file) = file else { return Ok(None) };
        let full = base.join(file);
        watched.push(std::path::absolute(&full).unwrap_or_else(|_| full.clone()));
        // One bounded read (one byte past the limit tells an oversized file).
        let mut text = String::new();
        let read = std::fs::File::open(&full).and_then(|f| {
            std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_PROTOS_BYTES as u64 + 1), &mut text)
        });
        let problem = match read {
            Ok(n) if n > MAX_PROTOS_BYTES => {
                format!("{}: too large; a protos file is at most {MAX_PROTOS_BYTES} bytes", full.display())
            }
            Ok(_) => return Ok(Some(text)),
            Err(e) => format!("cannot read {}: {e}", full.display()),
        };
        ctx.err(&child(path, key), problem);
        Err(())
    };
    let server = read(&paths.server, Side::Server.file_key());
    let client = read(&paths.client, Side::Client.file_key());
    let (Ok(server), Ok(client)) = (server, client) else { return None };
    let bundle = match ProtoBundle::new(server.as_deref(), client.as_deref()) {
        Ok(bundle) => bundle,
        Err(e) => {
            ctx.err(&child(path, e.side.file_key()), e.error.to_string());
            return None;
        }
    };
    // The chat server's pushes must fit their protos: found now, not as pushes that never leave.
    let pushes = [
        (
            "onChat",
            serde_json::json!({"msg": "", "from": "", "target": "*", "epoch": "", "offset": 1}),
            "{msg, from, target, epoch} (strings) and offset (a number)",
        ),
        ("onAdd", serde_json::json!({"route": "onAdd", "user": ""}), "{route, user} (strings)"),
        ("onLeave", serde_json::json!({"route": "onLeave", "user": ""}), "{route, user} (strings)"),
    ];
    let mut fits = true;
    for (route, sample, sends) in pushes {
        if let Some(Err(e)) = bundle.encode(route, &sample) {
            ctx.err(&child(path, Side::Server.file_key()), format!("{e}: the chat server sends {route} {sends}"));
            fits = false;
        }
    }
    fits.then_some(ProtobufTexts { server, client })
}

/// The `dictionary` entries: routes (1 to 255 bytes, a message's route length is one byte), the whole
/// dictionary within 65,535 codes (two bytes).
fn read_dictionary(ctx: &mut Ctx, value: &Value, path: &[Seg]) -> Vec<String> {
    let Value::Sequence(items) = value else {
        ctx.err(path, "expected a list of routes, as Pomelo's config/dictionary.json");
        return Vec::new();
    };
    let mut routes = Vec::with_capacity(items.len());
    for (i, v) in items.iter().enumerate() {
        let p = super::walk::item(path, i);
        match v.as_str() {
            Some(r) if !r.is_empty() && r.len() <= 255 && !r.chars().any(char::is_control) => routes.push(r.to_owned()),
            Some(_) => ctx.err(&p, "a route is 1 to 255 bytes, without control characters"),
            None => ctx.err(&p, "expected a route (a string)"),
        }
    }
    if let Err(e) = crate::wire::dictionary::chat_dictionary(&routes) {
        ctx.err(path, e.to_string());
        return Vec::new();
    }
    routes
}
