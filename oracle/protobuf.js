// Pomelo's protobuf body codec as an oracle for pomelo-rs tests (proto/tests/protobuf_oracle.rs).
//
// Reads one JSON command per line on stdin and writes one JSON answer per line on stdout. Every command
// names the library and carries the raw protos (the serverProtos.json / clientProtos.json format):
//   lib "pomelo": pomelo-protobuf 0.4.0, the server side (lib/protobuf.js), as Pomelo's connector uses it
//   lib "client": pomelo-protobuf 0.4.0's browser copy (lib/client/protobuf.js), as the JS client uses it
//   lib "pinus":  pinus-protobuf 1.7.4, which adds bool, uInt64 and sInt64
// Commands:
//   {"op":"encode","lib":L,"protos":{...},"route":R,"msg":{...}}  -> {"hex":"..."|null,"logs":[...]}
//   {"op":"decode","lib":L,"protos":{...},"route":R,"hex":"..."}  -> {"msg":...,"logs":[...]}
//   {"op":"parsed","client":"<file text>"|null,"server":"<file text>"|null}
//       -> {"client":"<JSON.stringify(parse(file))>","server":...,"version":"..."} as Pomelo's protobuf
//          component computes them (a missing file is {})
// Numbers that JSON cannot carry exactly (non-integers, beyond 2^53, -0, NaN, infinities) travel both
// ways as {"$f64":"<16 hex digits of the IEEE-754 bits, big-endian>"}. The libraries log with
// console.*; that is captured into "logs" so it cannot corrupt stdout. A thrown error answers
// {"error":"...","logs":[...]}. The process exits when stdin closes.
'use strict';
const crypto = require('crypto');
const readline = require('readline');
const PomeloProtobuf = require('pomelo-protobuf');
const ClientProtobuf = require('pomelo-protobuf/lib/client/protobuf');
const { Protobuf: PinusProtobuf } = require('pinus-protobuf');

let logs = [];
const capture = (...args) => logs.push(args.map((a) => (typeof a === 'string' ? a : JSON.stringify(a))).join(' '));
console.log = capture;
console.warn = capture;
console.error = capture;
console.info = capture;

const f64ToHex = (x) => {
  const b = Buffer.alloc(8);
  b.writeDoubleBE(x, 0);
  return b.toString('hex');
};
const hexToF64 = (s) => Buffer.from(s, 'hex').readDoubleBE(0);

function tag(v) {
  if (typeof v === 'number') {
    return Number.isSafeInteger(v) && !Object.is(v, -0) ? v : { $f64: f64ToHex(v) };
  }
  if (Array.isArray(v)) return v.map(tag);
  if (v && typeof v === 'object') {
    const out = {};
    for (const k of Object.keys(v)) out[k] = tag(v[k]);
    return out;
  }
  return v;
}

function untag(v) {
  if (Array.isArray(v)) return v.map(untag);
  if (v && typeof v === 'object') {
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === '$f64') return hexToF64(v.$f64);
    const out = {};
    for (const k of keys) out[k] = untag(v[k]);
    return out;
  }
  return v;
}

function codec(lib, raw) {
  switch (lib) {
    case 'pomelo': {
      const protos = PomeloProtobuf.parse(raw);
      PomeloProtobuf.init({ encoderProtos: protos, decoderProtos: protos });
      return PomeloProtobuf;
    }
    case 'client': {
      // The browser copy has no parser: Pomelo's server parses the protos and sends the parsed form
      // (with __messages and __tags) in the handshake, which the client hands to init as it is.
      const protos = PomeloProtobuf.parse(raw);
      ClientProtobuf.init({ encoderProtos: protos, decoderProtos: protos });
      return ClientProtobuf;
    }
    case 'pinus': {
      const protos = PinusProtobuf.parse(raw);
      return new PinusProtobuf({ encoderProtos: protos, decoderProtos: protos });
    }
    default:
      throw new Error('unknown lib ' + lib);
  }
}

function parsed(text) {
  return JSON.stringify(text === null || text === undefined ? {} : PomeloProtobuf.parse(JSON.parse(text)));
}

function run(cmd) {
  if (cmd.op === 'parsed') {
    const client = parsed(cmd.client);
    const server = parsed(cmd.server);
    const version = crypto.createHash('md5').update(client + server).digest('base64');
    return { client, server, version };
  }
  const pb = codec(cmd.lib, cmd.protos);
  switch (cmd.op) {
    case 'encode': {
      const out = pb.encode(cmd.route, untag(cmd.msg));
      return { hex: out ? Buffer.from(out).toString('hex') : null };
    }
    case 'decode': {
      const bytes = Buffer.from(cmd.hex || '', 'hex');
      const input = cmd.lib === 'client' ? new Uint8Array(bytes) : bytes;
      const msg = pb.decode(cmd.route, input);
      return { msg: msg === undefined ? null : tag(msg) };
    }
    default:
      throw new Error('unknown op ' + cmd.op);
  }
}

const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on('line', (line) => {
  if (!line.trim()) return;
  logs = [];
  let out;
  try {
    out = run(JSON.parse(line));
  } catch (e) {
    out = { error: String(e && e.message ? e.message : e) };
  }
  out.logs = logs;
  process.stdout.write(JSON.stringify(out) + '\n');
});
