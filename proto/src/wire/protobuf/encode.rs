//! Encoding a JSON value with a compiled route, as pomelo-protobuf's server encoder does.
//!
//! Fields go out in the order of the value's keys, as the JS `for (name in msg)` walks them (array
//! index keys first, ascending, then the rest in map order); keys the proto does not name are skipped.
//! serde_json's map is sorted by key (unless its `preserve_order` feature is on), so our bytes are the
//! JS bytes for an object whose keys come in that order; any order decodes to the same value.
//! Nested messages are written in place: one byte is reserved for the length and the body is moved
//! only when its length needs more than one byte, so one output `Vec` is all that is allocated.
//! Pure, no I/O.

use serde_json::{Map, Value};
use thiserror::Error;

use super::schema::{is_index_like, Field, FieldType, Label, MessageDef, Protos, Scalar};
use super::strings::{self, Strings};
use super::{MAX_DEPTH, MAX_SAFE};

/// Why a value could not be encoded. `path` is the route, then field names (and `[i]` for elements).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}: {kind}")]
pub struct EncodeError {
    pub path: String,
    pub kind: EncodeErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeErrorKind {
    #[error("no proto for this route")]
    UnknownRoute,
    #[error("required field is missing")]
    MissingRequired,
    #[error("expected {expected}, found {found}")]
    WrongType { expected: &'static str, found: &'static str },
    #[error("{value} is out of range for {ty} (JavaScript numbers are exact only up to 2^53)")]
    OutOfRange { ty: &'static str, value: String },
    #[error("messages nested more than {MAX_DEPTH} deep")]
    TooDeep,
}

impl EncodeError {
    fn new(kind: EncodeErrorKind) -> EncodeError {
        EncodeError { path: String::new(), kind }
    }

    /// Prefixes `segment` on the way out of a recursion (errors only, so the happy path never allocates).
    fn within(mut self, segment: &str) -> EncodeError {
        self.path = if self.path.is_empty() || self.path.starts_with('[') {
            format!("{segment}{}", self.path)
        } else {
            format!("{segment}.{}", self.path)
        };
        self
    }
}

fn found(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong(expected: &'static str, v: &Value) -> EncodeError {
    EncodeError::new(EncodeErrorKind::WrongType { expected, found: found(v) })
}

/// `n` as a base-128 varint: the bytes and how many of them are used.
fn varint_bytes(mut n: u64) -> ([u8; 10], usize) {
    let mut b = [0u8; 10];
    let mut i = 0;
    while n >= 0x80 {
        b[i] = (n as u8 & 0x7f) | 0x80;
        n >>= 7;
        i += 1;
    }
    b[i] = n as u8;
    (b, i + 1)
}

/// Appends `n` as a base-128 varint.
pub fn put_varint(out: &mut Vec<u8>, n: u64) {
    let (b, len) = varint_bytes(n);
    out.extend_from_slice(&b[..len]);
}

fn varint_len(n: u64) -> usize {
    (64 - (n | 1).leading_zeros() as usize).div_ceil(7)
}

/// A JSON number as JS `parseInt(String(n))` reads it, for the range where that is truncation.
fn integer(v: &Value, ty: &'static str) -> Result<i64, EncodeError> {
    let Value::Number(n) = v else { return Err(wrong("a number", v)) };
    let out_of_range = || EncodeError::new(EncodeErrorKind::OutOfRange { ty, value: n.to_string() });
    if let Some(i) = n.as_i64() {
        return if i.unsigned_abs() <= MAX_SAFE { Ok(i) } else { Err(out_of_range()) };
    }
    if n.is_u64() {
        return Err(out_of_range());
    }
    let x = n.as_f64().ok_or_else(out_of_range)?;
    // parseInt reads "1e+21" as 1 and "5e-7" as 5: refuse what it would misread.
    if !x.is_finite() || x.abs() >= 1e21 || (x != 0.0 && x.abs() < 1e-6) {
        return Err(out_of_range());
    }
    let t = x.trunc();
    if t.abs() > MAX_SAFE as f64 {
        return Err(out_of_range());
    }
    Ok(t as i64)
}

fn unsigned(v: &Value, ty: &'static str) -> Result<u64, EncodeError> {
    let i = integer(v, ty)?;
    u64::try_from(i)
        .ok()
        .filter(|&u| u <= MAX_SAFE)
        .ok_or_else(|| EncodeError::new(EncodeErrorKind::OutOfRange { ty, value: i.to_string() }))
}

/// Pomelo's zig-zag: `n < 0 ? |n| * 2 - 1 : n * 2`, exact while the result stays within 2^53.
fn zigzag(v: &Value, ty: &'static str) -> Result<u64, EncodeError> {
    let i = integer(v, ty)?;
    let z = if i < 0 { i.unsigned_abs() * 2 - 1 } else { i.unsigned_abs() * 2 };
    if z > MAX_SAFE {
        return Err(EncodeError::new(EncodeErrorKind::OutOfRange { ty, value: i.to_string() }));
    }
    Ok(z)
}

fn number(v: &Value) -> Result<f64, EncodeError> {
    v.as_f64().ok_or_else(|| wrong("a number", v))
}

impl Protos {
    /// Encodes `msg` with `route`'s proto. An empty result is what pomelo-protobuf returns as `null`
    /// (nothing to write): Pomelo sends that as an empty body, which decodes back to `{}`.
    pub fn encode(&self, route: &str, msg: &Value) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        self.encode_into(route, msg, &mut out)?;
        Ok(out)
    }

    /// [`Protos::encode`] appending to `out`; on error `out` is left as it was.
    pub fn encode_into(&self, route: &str, msg: &Value, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_with(route, msg, out, Strings::Utf8)
    }

    /// [`Protos::encode_into`] writing strings in `mode` ([`Strings::Cesu8`] for the JS browser client).
    pub fn encode_with(&self, route: &str, msg: &Value, out: &mut Vec<u8>, mode: Strings) -> Result<(), EncodeError> {
        let start = out.len();
        let r = match (self.route(route), msg) {
            (None, _) => Err(EncodeError::new(EncodeErrorKind::UnknownRoute)),
            (Some(def), Value::Object(map)) => self.encode_msg(def, map, out, 0, mode),
            (Some(_), other) => Err(wrong("an object", other)),
        };
        r.map_err(|e| {
            out.truncate(start);
            e.within(route)
        })
    }

    fn encode_msg(
        &self,
        def: &MessageDef,
        map: &Map<String, Value>,
        out: &mut Vec<u8>,
        depth: usize,
        mode: Strings,
    ) -> Result<(), EncodeError> {
        if depth >= MAX_DEPTH {
            return Err(EncodeError::new(EncodeErrorKind::TooDeep));
        }
        // pomelo-protobuf's checkMsg: every required field present (JS `undefined`), checked first.
        for f in def.fields.iter().filter(|f| f.label == Label::Required) {
            if !map.contains_key(&*f.name) {
                return Err(EncodeError::new(EncodeErrorKind::MissingRequired).within(&f.name));
            }
        }
        if def.index_like_names {
            let mut keys: Vec<(&String, &Value)> = map.iter().filter(|(k, _)| def.field(k).is_some()).collect();
            keys.sort_by_key(|(k, _)| if is_index_like(k) { (0, k.parse::<u64>().unwrap_or(0)) } else { (1, 0) });
            for (k, v) in keys {
                if let Some(f) = def.field(k) {
                    self.encode_field(f, v, out, depth, mode).map_err(|e| e.within(k))?;
                }
            }
        } else {
            for (k, v) in map {
                if let Some(f) = def.field(k) {
                    self.encode_field(f, v, out, depth, mode).map_err(|e| e.within(k))?;
                }
            }
        }
        Ok(())
    }

    fn encode_field(
        &self,
        f: &Field,
        v: &Value,
        out: &mut Vec<u8>,
        depth: usize,
        mode: Strings,
    ) -> Result<(), EncodeError> {
        match f.label {
            // JS would throw on null (or fail checkMsg for a message); here an optional null means absent.
            Label::Optional if v.is_null() => Ok(()),
            Label::Required | Label::Optional => {
                out.extend_from_slice(&f.key);
                self.encode_value(f.ty, v, out, depth, mode)
            }
            // `!!msg[name] && msg[name].length > 0`: null and [] write nothing.
            Label::Repeated => {
                let items = match v {
                    Value::Null => return Ok(()),
                    Value::Array(a) => a,
                    other => return Err(wrong("an array", other)),
                };
                if items.is_empty() {
                    return Ok(());
                }
                if f.ty.is_packed() {
                    out.extend_from_slice(&f.key);
                    put_varint(out, items.len() as u64);
                    for (i, item) in items.iter().enumerate() {
                        self.encode_value(f.ty, item, out, depth, mode).map_err(|e| e.within(&format!("[{i}]")))?;
                    }
                } else {
                    for (i, item) in items.iter().enumerate() {
                        out.extend_from_slice(&f.key);
                        self.encode_value(f.ty, item, out, depth, mode).map_err(|e| e.within(&format!("[{i}]")))?;
                    }
                }
                Ok(())
            }
        }
    }

    fn encode_value(
        &self,
        ty: FieldType,
        v: &Value,
        out: &mut Vec<u8>,
        depth: usize,
        mode: Strings,
    ) -> Result<(), EncodeError> {
        match ty {
            FieldType::Scalar(Scalar::UInt32) => put_varint(out, unsigned(v, "uInt32")?),
            FieldType::Scalar(Scalar::UInt64) => put_varint(out, unsigned(v, "uInt64")?),
            FieldType::Scalar(Scalar::SInt32) => put_varint(out, zigzag(v, "sInt32")?),
            FieldType::Scalar(Scalar::Int32) => put_varint(out, zigzag(v, "int32")?),
            FieldType::Scalar(Scalar::SInt64) => put_varint(out, zigzag(v, "sInt64")?),
            // Buffer.writeFloatLE rounds to nearest, ties to even, and overflows to ±Infinity, as `as f32` does.
            FieldType::Scalar(Scalar::Float) => out.extend_from_slice(&(number(v)? as f32).to_le_bytes()),
            FieldType::Scalar(Scalar::Double) => out.extend_from_slice(&number(v)?.to_le_bytes()),
            FieldType::Scalar(Scalar::String) => {
                let s = v.as_str().ok_or_else(|| wrong("a string", v))?;
                put_varint(out, strings::encoded_len(s, mode) as u64);
                strings::put(out, s, mode);
            }
            FieldType::Scalar(Scalar::Bool) => out.push(u8::from(v.as_bool().ok_or_else(|| wrong("a boolean", v))?)),
            FieldType::Message(id) => {
                let Value::Object(map) = v else { return Err(wrong("an object", v)) };
                let at = out.len();
                out.push(0);
                self.encode_msg(self.message(id), map, out, depth + 1, mode)?;
                let len = out.len() - at - 1;
                let extra = varint_len(len as u64) - 1;
                if extra > 0 {
                    out.resize(out.len() + extra, 0);
                    out.copy_within(at + 1..at + 1 + len, at + 1 + extra);
                }
                let (prefix, n) = varint_bytes(len as u64);
                out[at..at + n].copy_from_slice(&prefix[..n]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        for (n, bytes) in
            [(0u64, vec![0u8]), (1, vec![1]), (127, vec![0x7f]), (128, vec![0x80, 1]), (300, vec![0xac, 2])]
        {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            assert_eq!(out, bytes);
            assert_eq!(varint_len(n), bytes.len());
        }
        assert_eq!(varint_len(u64::MAX), 10);
    }
}
