//! Decoding a body with a compiled route, as pomelo-protobuf's decoder does, but total and bounded.
//!
//! Like the JS decoder, the wire type in a key is ignored (the proto decides how to read the value;
//! the JS browser client writes wire type 2 for every varint), a field seen twice keeps the last
//! value, repeated fields append, and required fields are not checked. Unlike it, every read is
//! checked against the end of the input or of the enclosing message (the JS decoder reads past it),
//! varints longer than 10 bytes or beyond 2^53 are refused, an unknown tag is an error (the JS decoder
//! throws a TypeError), and messages nest at most [`MAX_DEPTH`] deep. Invalid UTF-8 in a string
//! becomes U+FFFD, as Node's `buffer.toString('utf8')` does (or see [`Strings::Cesu8`]). NaN and infinite floats decode to
//! `null`, which is what `JSON.stringify` makes of them. Pure, no I/O.

use serde_json::{Map, Number, Value};
use thiserror::Error;

use super::schema::{FieldType, Label, MessageDef, Protos, Scalar};
use super::strings::{self, Strings};
use super::{MAX_DEPTH, MAX_SAFE};

/// Why a body could not be decoded: at which byte offset of the body, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{route}: byte {offset}: {kind}")]
pub struct DecodeError {
    pub route: String,
    pub offset: usize,
    pub kind: DecodeErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeErrorKind {
    #[error("no proto for this route")]
    UnknownRoute,
    #[error("the body ends inside a value")]
    Truncated,
    #[error("a varint runs past 10 bytes or past 64 bits")]
    VarintTooLong,
    #[error("varint {0} is beyond 2^53, where JavaScript numbers stop being exact")]
    VarintTooLarge(u64),
    #[error("tag {tag} is not a field of {message}")]
    UnknownTag { tag: u64, message: String },
    #[error("messages nested more than {MAX_DEPTH} deep")]
    TooDeep,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Where `buf` starts in the whole body, for error offsets.
    base: usize,
}

type Fail = (usize, DecodeErrorKind);

impl<'a> Reader<'a> {
    fn fail(&self, kind: DecodeErrorKind) -> Fail {
        (self.base + self.pos, kind)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn varint(&mut self) -> Result<u64, Fail> {
        let mut n: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos + i) else {
                return Err(self.fail(DecodeErrorKind::Truncated));
            };
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(self.fail(DecodeErrorKind::VarintTooLong));
            }
            n |= bits << (7 * i);
            if b < 0x80 {
                self.pos += i + 1;
                return Ok(n);
            }
        }
        Err(self.fail(DecodeErrorKind::VarintTooLong))
    }

    /// A varint that a JS number holds exactly.
    fn safe_varint(&mut self) -> Result<u64, Fail> {
        let at = self.pos;
        let n = self.varint()?;
        if n > MAX_SAFE {
            return Err((self.base + at, DecodeErrorKind::VarintTooLarge(n)));
        }
        Ok(n)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Fail> {
        if n > self.remaining() {
            return Err(self.fail(DecodeErrorKind::Truncated));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn length(&mut self) -> Result<usize, Fail> {
        let at = self.pos;
        let n = self.varint()?;
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err((self.base + at, DecodeErrorKind::Truncated)),
        }
    }
}

fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Pomelo's zig-zag back: odd is negative.
fn unzigzag(z: u64) -> i64 {
    // z <= 2^53, so both arms are exact.
    if z % 2 == 1 {
        -((z / 2) as i64) - 1
    } else {
        (z / 2) as i64
    }
}

impl Protos {
    /// Decodes a body of `route`. An empty body is `{}`.
    pub fn decode(&self, route: &str, body: &[u8]) -> Result<Value, DecodeError> {
        self.decode_with(route, body, Strings::Utf8)
    }

    /// [`Protos::decode`] reading strings in `mode` ([`Strings::Cesu8`] joins the JS browser client's
    /// surrogate pairs into the characters they stand for).
    pub fn decode_with(&self, route: &str, body: &[u8], mode: Strings) -> Result<Value, DecodeError> {
        let err = |(offset, kind)| DecodeError { route: route.to_owned(), offset, kind };
        let def = self.route(route).ok_or_else(|| err((0, DecodeErrorKind::UnknownRoute)))?;
        let mut r = Reader { buf: body, pos: 0, base: 0 };
        self.decode_msg(def, &mut r, 0, mode).map(Value::Object).map_err(err)
    }

    fn decode_msg(
        &self,
        def: &MessageDef,
        r: &mut Reader<'_>,
        depth: usize,
        mode: Strings,
    ) -> Result<Map<String, Value>, Fail> {
        if depth >= MAX_DEPTH {
            return Err(r.fail(DecodeErrorKind::TooDeep));
        }
        let mut msg = Map::new();
        while r.remaining() > 0 {
            let at = r.pos;
            let tag = r.varint()? >> 3;
            let Some(f) = def.by_tag(tag) else {
                return Err((r.base + at, DecodeErrorKind::UnknownTag { tag, message: def.path.to_string() }));
            };
            match f.label {
                Label::Required | Label::Optional => {
                    let v = self.decode_value(f.ty, r, depth, mode)?;
                    msg.insert(f.name.to_string(), v);
                }
                Label::Repeated => {
                    let slot = msg.entry(&*f.name).or_insert_with(|| Value::Array(Vec::new()));
                    let Value::Array(items) = slot else {
                        // Only this field writes under its name, and always an array.
                        return Err(r.fail(DecodeErrorKind::Truncated));
                    };
                    if f.ty.is_packed() {
                        let at = r.pos;
                        let count = r.varint()?;
                        // Every element takes at least one byte: a count beyond the input is a lie.
                        if count > r.remaining() as u64 {
                            return Err((r.base + at, DecodeErrorKind::Truncated));
                        }
                        items.reserve(count as usize);
                        for _ in 0..count {
                            items.push(self.decode_value(f.ty, r, depth, mode)?);
                        }
                    } else {
                        items.push(self.decode_value(f.ty, r, depth, mode)?);
                    }
                }
            }
        }
        Ok(msg)
    }

    fn decode_value(&self, ty: FieldType, r: &mut Reader<'_>, depth: usize, mode: Strings) -> Result<Value, Fail> {
        Ok(match ty {
            FieldType::Scalar(Scalar::UInt32 | Scalar::UInt64) => Value::from(r.safe_varint()?),
            FieldType::Scalar(Scalar::SInt32 | Scalar::Int32 | Scalar::SInt64) => {
                Value::from(unzigzag(r.safe_varint()?))
            }
            FieldType::Scalar(Scalar::Bool) => Value::Bool(r.varint()? != 0),
            FieldType::Scalar(Scalar::Float) => {
                let b = r.take(4)?;
                float(f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            }
            FieldType::Scalar(Scalar::Double) => {
                let b = r.take(8)?;
                float(f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            }
            FieldType::Scalar(Scalar::String) => {
                let n = r.length()?;
                Value::String(strings::read(r.take(n)?, mode))
            }
            FieldType::Message(id) => {
                let n = r.length()?;
                let base = r.base + r.pos;
                let mut inner = Reader { buf: r.take(n)?, pos: 0, base };
                Value::Object(self.decode_msg(self.message(id), &mut inner, depth + 1, mode)?)
            }
        })
    }
}
