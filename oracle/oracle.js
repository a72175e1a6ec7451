// Pomelo's own codec as an oracle for pomelo-rs tests.
//
// Reads one JSON command per line on stdin and writes one JSON answer per line on stdout, using
// pomelo-protocol 0.1.6 exactly as Pomelo's server and JS client do. Bytes travel as lowercase hex.
// Commands:
//   {"op":"pkg_encode","type":N,"body":"<hex>"}             -> {"hex":...}
//   {"op":"pkg_decode","hex":...}                            -> {"packages":[{"type":N,"body":"<hex>"}]}
//   {"op":"msg_encode","id":N,"type":N,"compressRoute":0|1,"route":"str"|N,"body":"<utf8 text>"}
//                                                            -> {"hex":...}
//   {"op":"msg_decode","hex":...}                            -> {"id","type","compressRoute","route","body","bodyHex","compressGzip"}
//   {"op":"strencode","text":"..."}                         -> {"hex":...}   (the browser client's body bytes)
//   {"op":"json_strdecode","hex":...}                        -> {"text","value"} (its strdecode, then JSON.parse)
// Errors answer {"error":"..."}. The process exits when stdin closes.
'use strict';
const readline = require('readline');
const Protocol = require('pomelo-protocol');
const { Package, Message } = Protocol;

// The same file as the browser runs it (pomelo-jsclient-websocket bundles it): with `window` defined and
// no Buffer, its strencode/strdecode take the hand-written UTF-16 path (CESU-8 out, no 4-byte branch in).
const Browser = (() => {
  const src = require('fs').readFileSync(require.resolve('pomelo-protocol/lib/protocol.js'), 'utf8');
  const sandbox = { window: {}, module: { exports: {} }, Uint8Array };
  require('vm').runInNewContext(src, sandbox);
  return sandbox.window.Protocol;
})();

const hex = (b) => (b ? Buffer.from(b).toString('hex') : '');
const unhex = (s) => Buffer.from(s || '', 'hex');

function run(cmd) {
  switch (cmd.op) {
    case 'pkg_encode': {
      const body = cmd.body ? unhex(cmd.body) : undefined;
      return { hex: hex(Package.encode(cmd.type, body && body.length ? body : undefined)) };
    }
    case 'pkg_decode': {
      let r = Package.decode(unhex(cmd.hex));
      if (!Array.isArray(r)) r = [r];
      return { packages: r.map((p) => ({ type: p.type, body: hex(p.body) })) };
    }
    case 'msg_encode': {
      const body = cmd.body === undefined || cmd.body === null ? undefined : Protocol.strencode(cmd.body);
      return { hex: hex(Message.encode(cmd.id, cmd.type, cmd.compressRoute, cmd.route, body)) };
    }
    case 'msg_decode': {
      const m = Message.decode(unhex(cmd.hex));
      return {
        id: m.id,
        type: m.type,
        compressRoute: m.compressRoute,
        route: m.route,
        body: Protocol.strdecode(m.body),
        bodyHex: hex(m.body),
        compressGzip: m.compressGzip,
      };
    }
    case 'strencode':
      return { hex: hex(Browser.strencode(cmd.text)) };
    case 'json_strdecode': {
      // What the JS client does with a body: strdecode, then JSON.parse.
      const text = Browser.strdecode(unhex(cmd.hex));
      let value = null;
      try { value = JSON.parse(text); } catch (e) { value = null; }
      return { text, value };
    }
    default:
      throw new Error('unknown op ' + cmd.op);
  }
}

const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on('line', (line) => {
  if (!line.trim()) return;
  let out;
  try {
    out = run(JSON.parse(line));
  } catch (e) {
    out = { error: String(e && e.message ? e.message : e) };
  }
  process.stdout.write(JSON.stringify(out) + '\n');
});
