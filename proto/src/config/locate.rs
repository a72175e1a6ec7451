//! Finds the line a YAML path starts on, for error messages.
//!
//! The YAML parser gives values without positions, so validation reports problems by path
//! (`servers.chat[1].port`) and this module maps a path back to a line by scanning the text the way
//! a person reads block-style YAML: indentation opens and closes mappings, `- ` opens a list item.
//! Keys inside flow-style `{...}` are not indexed; their errors point at the enclosing line.

use std::collections::HashMap;

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Path → 1-based line, for every key and list item written in block style.
#[derive(Debug, Default)]
pub struct LineIndex {
    lines: HashMap<Vec<Seg>, usize>,
}

struct Frame {
    indent: usize,
    seg: Seg,
    /// Items seen so far in a list that is this frame's value.
    items: usize,
}

impl LineIndex {
    pub fn build(text: &str) -> LineIndex {
        let mut index = LineIndex::default();
        let mut stack: Vec<Frame> = Vec::new();
        // Items counted for a list at the document root (unused by servers.yaml, kept for completeness).
        let mut root_items = 0usize;
        for (n, raw) in text.lines().enumerate() {
            let line_no = n + 1;
            let indent = raw.len() - raw.trim_start_matches(' ').len();
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') || content == "---" {
                continue;
            }
            let (is_item, rest, rest_indent) = match content.strip_prefix('-') {
                Some(r) if r.is_empty() || r.starts_with(' ') => {
                    let r2 = r.trim_start();
                    (true, r2, indent + 1 + (r.len() - r2.len()))
                }
                _ => (false, content, indent),
            };
            if is_item {
                // A list item belongs to the nearest key with a smaller indent, or the same indent
                // (YAML allows `key:\n- item` without extra indentation).
                while stack
                    .last()
                    .is_some_and(|f| f.indent > indent || (f.indent == indent && matches!(f.seg, Seg::Index(_))))
                {
                    stack.pop();
                }
                let i = match stack.last_mut() {
                    Some(parent) => {
                        parent.items += 1;
                        parent.items - 1
                    }
                    None => {
                        root_items += 1;
                        root_items - 1
                    }
                };
                stack.push(Frame { indent, seg: Seg::Index(i), items: 0 });
                index.record(&stack, line_no);
                if let Some(key) = key_of(rest) {
                    stack.push(Frame { indent: rest_indent, seg: Seg::Key(key), items: 0 });
                    index.record(&stack, line_no);
                }
            } else if let Some(key) = key_of(rest) {
                while stack.last().is_some_and(|f| f.indent >= indent) {
                    stack.pop();
                }
                stack.push(Frame { indent, seg: Seg::Key(key), items: 0 });
                index.record(&stack, line_no);
            }
        }
        index
    }

    fn record(&mut self, stack: &[Frame], line: usize) {
        let path: Vec<Seg> = stack.iter().map(|f| f.seg.clone()).collect();
        self.lines.entry(path).or_insert(line);
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line_of(&self, path: &[Seg]) -> Option<usize> {
        (0..=path.len()).rev().find_map(|len| self.lines.get(&path[..len]).copied())
    }
}

/// The key of a `key: value` or `key:` line, unquoted.
fn key_of(content: &str) -> Option<String> {
    if content.starts_with('{') || content.starts_with('[') {
        return None;
    }
    let end = content.find(": ").or_else(|| content.strip_suffix(':').map(|c| c.len()))?;
    let key = content[..end].trim();
    let key = key
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .or_else(|| key.strip_prefix('\'').and_then(|k| k.strip_suffix('\'')))
        .unwrap_or(key);
    Some(key.to_string())
}

/// Renders a path as `servers.chat[1].port`.
pub fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &[&str]) -> Vec<Seg> {
        s.iter()
            .map(|x| match x.parse::<usize>() {
                Ok(i) => Seg::Index(i),
                Err(_) => Seg::Key(x.to_string()),
            })
            .collect()
    }

    #[test]
    fn finds_keys_and_list_items() {
        let text = "master:\n  host: 127.0.0.1\n  restart:\n    maxRestarts: 5\nservers:\n  chat:\n    - id: a\n      port: 1\n    - id: b\n\n      port: 2\n  gate:\n  - {id: g, clientPort: 3}\n";
        let idx = LineIndex::build(text);
        assert_eq!(idx.line_of(&p(&["master", "host"])), Some(2));
        assert_eq!(idx.line_of(&p(&["master", "restart", "maxRestarts"])), Some(4));
        assert_eq!(idx.line_of(&p(&["servers", "chat", "0", "id"])), Some(7));
        assert_eq!(idx.line_of(&p(&["servers", "chat", "0", "port"])), Some(8));
        assert_eq!(idx.line_of(&p(&["servers", "chat", "1", "port"])), Some(11));
        assert_eq!(idx.line_of(&p(&["servers", "gate", "0", "clientPort"])), Some(13));
        assert_eq!(render(&p(&["servers", "chat", "1", "port"])), "servers.chat[1].port");
    }
}
