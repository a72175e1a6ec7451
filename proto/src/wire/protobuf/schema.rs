//! Compiling Pomelo's protos JSON (`serverProtos.json` / `clientProtos.json`) into [`Protos`].
//!
//! The input is `{"<route>": {"<label> <type> <name>": <tag>, "message <Name>": {...}}, "message <Name>": {...}}`.
//! Where pomelo-protobuf's parser silently skips what it cannot read (and its encoder then writes
//! corrupt bytes), compiling fails with a [`ProtosError`] naming the place. Type names resolve as
//! the JS codec resolves them at run time: a scalar name first, then the messages declared inside the
//! message that holds the field (for a route's own fields: the route's messages), then the root
//! `"message <Name>"` entries. A message declared in a route is *not* visible inside its sibling
//! messages: the JS codec does not look there either (it writes a tag with no value).
//! Pure data, no I/O.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};
use thiserror::Error;

use super::MAX_DEPTH;

/// The largest field tag: pomelo-protobuf computes `tag << 3` in 32-bit signed arithmetic.
pub const MAX_TAG: u64 = (1 << 28) - 1;

/// The scalar type names, pomelo-protobuf 0.4.0's plus pinus-protobuf's `bool`, `uInt64`, `sInt64`.
pub const SCALARS: &str = "uInt32, sInt32, int32, uInt64, sInt64, float, double, string, bool";

/// A problem in a protos file. `path` is the route, then message names, joined with `.`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtosError {
    #[error("protos: not JSON: {message}")]
    BadJson { message: String },
    #[error("protos: the top level must be an object of routes, found {found}")]
    NotAnObjectOfRoutes { found: &'static str },
    #[error("{path}: expected an object of fields and messages, found {found}")]
    NotAnObject { path: String, found: &'static str },
    #[error(
        "{path}: bad key {key:?}: write \"required|optional|repeated <type> <name>\" or \"message <Name>\", one space apart"
    )]
    BadKey { path: String, key: String },
    #[error("{path}: the tag of {name} must be an integer from 1 to {MAX_TAG}, found {found}")]
    BadTag { path: String, name: String, found: String },
    #[error("{path}: tag {tag} is used by both {first} and {second}; give each field its own tag")]
    DuplicateTag { path: String, tag: u32, first: String, second: String },
    #[error("{path}: field {name} is declared twice")]
    DuplicateField { path: String, name: String },
    #[error("{path}: field name {name} is reserved by pomelo-protobuf's parser; rename it")]
    ReservedName { path: String, name: String },
    #[error(
        "{path}.{field}: unknown type {ty}: not a scalar ({SCALARS}), not a message declared in {path}, not a root \"message {ty}\""
    )]
    UnknownType { path: String, field: String, ty: String },
    #[error("{path}: messages are declared more than {MAX_DEPTH} levels deep")]
    TooDeep { path: String },
}

/// How a field repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Required,
    Optional,
    Repeated,
}

/// A scalar field type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    UInt32,
    SInt32,
    Int32,
    UInt64,
    SInt64,
    Float,
    Double,
    String,
    Bool,
}

impl Scalar {
    fn from_name(s: &str) -> Option<Scalar> {
        Some(match s {
            "uInt32" => Scalar::UInt32,
            "sInt32" => Scalar::SInt32,
            "int32" => Scalar::Int32,
            "uInt64" => Scalar::UInt64,
            "sInt64" => Scalar::SInt64,
            "float" => Scalar::Float,
            "double" => Scalar::Double,
            "string" => Scalar::String,
            "bool" => Scalar::Bool,
            _ => return None,
        })
    }

    /// The wire type in the field key, as the server encoders write it (pinus for its additions).
    fn wire_type(self) -> u64 {
        match self {
            Scalar::Double => 1,
            Scalar::String => 2,
            Scalar::Float => 5,
            _ => 0,
        }
    }
}

/// A field's type: a scalar or a message (an index into [`Protos`]' messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Scalar(Scalar),
    Message(usize),
}

impl FieldType {
    /// Repeated values of a "simple" type are written count-prefixed after one key, as the JS
    /// `util.isSimpleType` decides: every scalar but `string` (pinus adds `bool`).
    pub fn is_packed(self) -> bool {
        matches!(self, FieldType::Scalar(s) if s != Scalar::String)
    }
}

/// One compiled field.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: Box<str>,
    pub tag: u32,
    pub label: Label,
    pub ty: FieldType,
    /// The encoded key varint `tag << 3 | wire type`, written before each value.
    pub key: Box<[u8]>,
}

/// One compiled message (a route's top level is a message too).
#[derive(Debug, Clone, Default)]
pub struct MessageDef {
    /// The route and message names, for errors.
    pub path: Box<str>,
    /// Sorted by tag.
    pub fields: Vec<Field>,
    by_name: HashMap<Box<str>, usize>,
    /// Some field name is a JS array index ("0", "17"): such keys come first in a JS object.
    pub index_like_names: bool,
}

impl MessageDef {
    pub fn field(&self, name: &str) -> Option<&Field> {
        // A few string compares beat hashing the key for the small messages that are the norm.
        if self.fields.len() <= 8 {
            return self.fields.iter().find(|f| &*f.name == name);
        }
        self.by_name.get(name).map(|&i| &self.fields[i])
    }

    pub fn by_tag(&self, tag: u64) -> Option<&Field> {
        let i = self.fields.binary_search_by(|f| u64::from(f.tag).cmp(&tag)).ok()?;
        Some(&self.fields[i])
    }
}

/// Compiled protos: one message per route, plus every nested and root message.
#[derive(Debug, Clone, Default)]
pub struct Protos {
    pub(super) messages: Vec<MessageDef>,
    pub(super) routes: HashMap<String, usize>,
}

/// A field as read, before its type name is resolved.
struct RawField {
    name: String,
    tag: u32,
    label: Label,
    ty: String,
}

/// A message as read: its fields and the messages declared inside it.
struct RawMessage {
    path: String,
    fields: Vec<RawField>,
    nested: HashMap<String, usize>,
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JS array index: canonical decimal below 2^32 - 1.
pub(super) fn is_index_like(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'))
        && s.parse::<u64>().is_ok_and(|n| n < u64::from(u32::MAX))
}

impl Protos {
    /// Compiles the text of a protos file.
    pub fn parse(text: &str) -> Result<Protos, ProtosError> {
        let v: Value = serde_json::from_str(text).map_err(|e| ProtosError::BadJson { message: e.to_string() })?;
        Protos::compile(&v)
    }

    /// Compiles an already-parsed protos object.
    pub fn compile(protos: &Value) -> Result<Protos, ProtosError> {
        let Value::Object(top) = protos else {
            return Err(ProtosError::NotAnObjectOfRoutes { found: kind_of(protos) });
        };
        let mut raw = Vec::new();
        let mut routes = HashMap::new();
        let mut roots = HashMap::new();
        for (key, body) in top {
            let root_message = key.split(' ').collect::<Vec<_>>();
            let id = read_message(&mut raw, key.clone(), body, 0)?;
            match root_message[..] {
                ["message", name] if !name.is_empty() => {
                    roots.insert(name.to_owned(), id);
                }
                _ => {
                    routes.insert(key.clone(), id);
                }
            }
        }
        let mut messages = Vec::with_capacity(raw.len());
        for m in &raw {
            let mut fields = Vec::with_capacity(m.fields.len());
            for f in &m.fields {
                let ty = match Scalar::from_name(&f.ty) {
                    Some(s) => FieldType::Scalar(s),
                    None => match m.nested.get(&f.ty).or_else(|| roots.get(&f.ty)) {
                        Some(&id) => FieldType::Message(id),
                        None => {
                            return Err(ProtosError::UnknownType {
                                path: m.path.clone(),
                                field: f.name.clone(),
                                ty: f.ty.clone(),
                            })
                        }
                    },
                };
                let wire = match ty {
                    FieldType::Scalar(s) => s.wire_type(),
                    FieldType::Message(_) => 2,
                };
                let mut key = Vec::with_capacity(5);
                super::encode::put_varint(&mut key, u64::from(f.tag) << 3 | wire);
                fields.push(Field { name: f.name.as_str().into(), tag: f.tag, label: f.label, ty, key: key.into() });
            }
            fields.sort_by_key(|f| f.tag);
            let by_name = fields.iter().enumerate().map(|(i, f)| (f.name.clone(), i)).collect();
            let index_like_names = fields.iter().any(|f| is_index_like(&f.name));
            messages.push(MessageDef { path: m.path.as_str().into(), fields, by_name, index_like_names });
        }
        Ok(Protos { messages, routes })
    }

    /// Whether `route` has a proto (a route without one keeps JSON bodies).
    pub fn has_route(&self, route: &str) -> bool {
        self.routes.contains_key(route)
    }

    /// The routes that have a proto, in no particular order.
    pub fn routes(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    pub(super) fn route(&self, route: &str) -> Option<&MessageDef> {
        self.routes.get(route).map(|&id| &self.messages[id])
    }

    pub(super) fn message(&self, id: usize) -> &MessageDef {
        &self.messages[id]
    }
}

/// Reads one message object (and, recursively, what is declared in it) into `raw`; returns its index.
fn read_message(raw: &mut Vec<RawMessage>, path: String, body: &Value, depth: usize) -> Result<usize, ProtosError> {
    if depth > MAX_DEPTH {
        return Err(ProtosError::TooDeep { path });
    }
    let Value::Object(obj) = body else {
        return Err(ProtosError::NotAnObject { path, found: kind_of(body) });
    };
    let id = raw.len();
    raw.push(RawMessage { path: path.clone(), fields: Vec::new(), nested: HashMap::new() });
    let (fields, nested) = read_members(raw, &path, obj, depth)?;
    raw[id].fields = fields;
    raw[id].nested = nested;
    Ok(id)
}

type Members = (Vec<RawField>, HashMap<String, usize>);

fn read_members(
    raw: &mut Vec<RawMessage>,
    path: &str,
    obj: &Map<String, Value>,
    depth: usize,
) -> Result<Members, ProtosError> {
    let mut fields: Vec<RawField> = Vec::new();
    let mut nested = HashMap::new();
    let mut tags: HashMap<u32, usize> = HashMap::new();
    let mut names: HashSet<&str> = HashSet::new();
    for (key, value) in obj {
        let bad_key = || ProtosError::BadKey { path: path.to_owned(), key: key.clone() };
        let parts: Vec<&str> = key.split(' ').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad_key());
        }
        let label = match parts[0] {
            "message" if parts.len() == 2 => {
                let id = read_message(raw, format!("{path}.{}", parts[1]), value, depth + 1)?;
                nested.insert(parts[1].to_owned(), id);
                continue;
            }
            "required" => Label::Required,
            "optional" => Label::Optional,
            "repeated" => Label::Repeated,
            _ => return Err(bad_key()),
        };
        let [_, ty, name] = parts[..] else { return Err(bad_key()) };
        if name == "__messages" || name == "__tags" {
            return Err(ProtosError::ReservedName { path: path.to_owned(), name: name.to_owned() });
        }
        let tag = value.as_u64().filter(|t| (1..=MAX_TAG).contains(t)).and_then(|t| u32::try_from(t).ok());
        let Some(tag) = tag else {
            return Err(ProtosError::BadTag { path: path.to_owned(), name: name.to_owned(), found: value.to_string() });
        };
        if let Some(&other) = tags.get(&tag) {
            return Err(ProtosError::DuplicateTag {
                path: path.to_owned(),
                tag,
                first: fields[other].name.clone(),
                second: name.to_owned(),
            });
        }
        // Keys are unique in a JSON object, but "required uInt32 a" and "optional string a" are not.
        if !names.insert(name) {
            return Err(ProtosError::DuplicateField { path: path.to_owned(), name: name.to_owned() });
        }
        tags.insert(tag, fields.len());
        fields.push(RawField { name: name.to_owned(), tag, label, ty: ty.to_owned() });
    }
    Ok((fields, nested))
}
