//! Pomelo's protobuf body dialect, byte for byte with npm `pomelo-protobuf` 0.4.0 (plus pinus-protobuf's
//! `bool`, `uInt64` and `sInt64`), checked against both in `proto/tests/protobuf_oracle.rs`.
//!
//! - [`schema`]: [`Protos::parse`] / [`Protos::compile`] turn a `serverProtos.json` / `clientProtos.json`
//!   into a compiled schema once; a bad proto is a [`ProtosError`] naming the place.
//! - [`encode`]: [`Protos::encode`] a `serde_json::Value` for a route into body bytes.
//! - [`decode`]: [`Protos::decode`] body bytes of a route into a `serde_json::Value`.
//! - [`strings`]: [`Strings::Utf8`] as Pomelo's server, or [`Strings::Cesu8`] as the JS browser
//!   client writes and reads strings (`encode_with` / `decode_with`), so emoji survive both ways.
//! - [`handshake`]: the parsed form of a protos file that Pomelo's handshake carries, byte for byte,
//!   and Pomelo's `version` of a client/server pair.
//!
//! The dialect is not Google's protobuf: a repeated number (every scalar but `string`) is written as one
//! key, then the element **count** (not a byte length), then the elements; keys carry wire types but
//! decoders ignore them; `int32` is zig-zag like `sInt32`; "uInt32" holds any integer a JS number does
//! (timestamps in milliseconds are common). Values are limited to what JavaScript holds exactly:
//! unsigned up to 2^53, signed within ±2^52 (so the zig-zag stays within 2^53).
//!
//! Where the JS codec logs and returns `null`, throws, or writes corrupt bytes, this module returns an
//! error instead: a missing required field, a value of the wrong JSON type (no `"12"` for a number, no
//! `1` for a bool), a number out of range, an unknown route, nesting deeper than [`MAX_DEPTH`]. Two
//! deliberate leniencies: `null` for an optional or repeated field means absent (JS throws), and a
//! message that encodes to nothing is an empty `Vec` (JS returns `null`, which Pomelo sends as an
//! empty body). Fractional numbers for integer fields are truncated, as JS `parseInt` does.
//!
//! Everything here is pure: no I/O, no tasks, nothing to shut down. Decoding is total and bounded:
//! any bytes give a value or an error, never a panic, and output grows at most linearly with input.
//!
//! - [`bundle`]: [`ProtoBundle`], both files of a cluster compiled with the handshake's `sys.protos`
//!   object, as the connector, the gate and the chat server use them (servers.yaml `protobuf`).
//!
//! Strings: servers write UTF-8, as Pomelo's server does (one encoding for every client, so a push is
//! still encoded once), and read CESU-8 and UTF-8 alike.

pub mod bundle;
pub mod decode;
pub mod encode;
pub mod handshake;
pub mod schema;
pub mod strings;

pub use bundle::{BundleError, ProtoBundle, Protobuf, Side, MAX_PROTOS_BYTES};
pub use decode::{DecodeError, DecodeErrorKind};
pub use encode::{EncodeError, EncodeErrorKind};
pub use schema::{FieldType, Label, Protos, ProtosError, Scalar};
pub use strings::Strings;

/// How deep messages may nest, in protos, in values to encode and in bodies to decode.
pub const MAX_DEPTH: usize = 32;

/// `Number.MAX_SAFE_INTEGER + 1`: the largest integer up to which every integer is a JS number.
pub const MAX_SAFE: u64 = 1 << 53;
