//! The walk over parsed YAML values that every section of `servers.yaml` shares: [`Ctx`] collects each
//! problem with its path and line (never stopping at the first), checks a mapping's keys against the
//! allowed ones with a "did you mean", and coerces values (strings, whole numbers, ports, booleans,
//! durations such as `10s`, sizes such as `10MiB`), reporting what it cannot coerce. Pure; no I/O.

use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::locate::{render, LineIndex, Seg};
use super::ConfigError;

/// The problems found so far, and where in the text each path is.
pub(super) struct Ctx {
    pub index: LineIndex,
    pub errors: Vec<ConfigError>,
}

impl Ctx {
    pub fn err(&mut self, path: &[Seg], message: impl Into<String>) {
        let e = ConfigError { line: self.index.line_of(path), path: render(path), message: message.into() };
        if !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }

    /// The entries of a mapping whose keys are all strings in `allowed`; reports the others.
    pub fn entries<'v>(&mut self, value: &'v Value, path: &[Seg], allowed: &[&str]) -> Vec<(String, &'v Value)> {
        let Some(map) = self.mapping(value, path) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in map {
            let Some(key) = k.as_str() else {
                self.err(path, format!("keys must be strings, found {}", describe(k)));
                continue;
            };
            if !allowed.contains(&key) {
                let p = child(path, key);
                let hint = suggest(key, allowed)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_else(|| format!("; expected one of: {}", allowed.join(", ")));
                self.err(&p, format!("unknown key `{key}`{hint}"));
                continue;
            }
            out.push((key.to_string(), v));
        }
        out
    }

    pub fn mapping<'v>(&mut self, value: &'v Value, path: &[Seg]) -> Option<&'v Mapping> {
        match value {
            Value::Mapping(m) => Some(m),
            Value::Null => None,
            other => {
                self.err(path, format!("expected a mapping, found {}", describe(other)));
                None
            }
        }
    }

    pub fn string(&mut self, v: &Value, path: &[Seg]) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            other => {
                self.err(path, format!("expected a string, found {}", describe(other)));
                None
            }
        }
    }

    pub fn uint(&mut self, v: &Value, path: &[Seg], max: u64) -> Option<u64> {
        match v.as_u64() {
            Some(n) if n <= max => Some(n),
            Some(n) => {
                self.err(path, format!("{n} is too large (at most {max})"));
                None
            }
            None => {
                self.err(path, format!("expected a whole number, found {}", describe(v)));
                None
            }
        }
    }

    pub fn port(&mut self, v: &Value, path: &[Seg]) -> Option<u16> {
        self.uint(v, path, u16::MAX as u64).map(|n| n as u16)
    }

    pub fn boolean(&mut self, v: &Value, path: &[Seg]) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                self.err(path, format!("expected true or false, found {}", describe(other)));
                None
            }
        }
    }

    pub fn duration(&mut self, v: &Value, path: &[Seg]) -> Option<Duration> {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => {
                self.err(path, format!("`{n}` has no unit; write a duration such as `{n}s` or `{n}ms`"));
                return None;
            }
            other => {
                self.err(path, format!("expected a duration such as `10s`, found {}", describe(other)));
                return None;
            }
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(path, format!("`{text}` is not a duration ({e}); write e.g. `500ms`, `10s`, `2m`"));
                None
            }
        }
    }

    pub fn size(&mut self, v: &Value, path: &[Seg]) -> Option<u64> {
        if let Some(n) = v.as_u64() {
            return Some(n);
        }
        let Some(text) = v.as_str() else {
            self.err(path, format!("expected a size such as `10MiB`, found {}", describe(v)));
            return None;
        };
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: Option<u64> = match unit.trim() {
            "" | "B" => Some(1),
            "KiB" | "K" => Some(1 << 10),
            "MiB" | "M" => Some(1 << 20),
            "GiB" | "G" => Some(1 << 30),
            "KB" | "kB" => Some(1000),
            "MB" => Some(1_000_000),
            "GB" => Some(1_000_000_000),
            _ => None,
        };
        match (num.parse::<u64>().ok(), mult) {
            (Some(n), Some(m)) => Some(n.saturating_mul(m)),
            _ => {
                self.err(path, format!("`{text}` is not a size; write e.g. `512KiB`, `10MiB`"));
                None
            }
        }
    }
}

pub(super) fn child(path: &[Seg], key: &str) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(Seg::Key(key.to_string()));
    p
}

pub(super) fn item(path: &[Seg], i: usize) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(Seg::Index(i));
    p
}

pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string `{s}`"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// The allowed key closest to a misspelt one, if any is close.
fn suggest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let lower = key.to_ascii_lowercase().replace(['-', '_'], "");
    allowed
        .iter()
        .map(|a| (edit_distance(&lower, &a.to_ascii_lowercase()), *a))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Sets `slot` to `v` when there is one (a value that did not coerce leaves the default).
pub(super) fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}
