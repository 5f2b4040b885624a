// Line-oriented bridge for tests/test_web_crossfuzz.py: one JSON request per stdin line, one JSON
// answer per stdout line. It lets Hypothesis (in Python) hand bytes to the browser implementation
// and compare what each side accepts, decodes and encodes. Not part of the bundle.
import { createInterface } from 'node:readline'
import { loads, dumps } from '../src/cbor.js'
import { FrameCipher, ready } from '../src/crypto.js'
import { ProtocolError } from '../src/errors.js'
import { decodeFrame, encodeFrame } from '../src/frames.js'
import {
  decodeControl, decodeRelayMessage, makeCaps, makeClose, makeHello, makePeerEvent, makePeerInfo, makeWelcome,
  relayMessage
} from '../src/messages.js'

const hex = (s) => Uint8Array.from(Buffer.from(s, 'hex'))
const toHex = (b) => Buffer.from(b).toString('hex')

// A decoded CBOR value as JSON the Python side can compare: bytes, bigints and maps are tagged.
function plain (v) {
  if (v instanceof Uint8Array) return { $bytes: toHex(v) }
  if (typeof v === 'bigint') return { $int: v.toString() }
  if (typeof v === 'number' && Number.isInteger(v)) return { $int: String(v) }
  if (typeof v === 'number') return { $float: Number.isNaN(v) ? 'nan' : String(v) }
  if (v instanceof Map) return { $map: [...v].map(([k, x]) => [plain(k), plain(x)]) }
  if (Array.isArray(v)) return v.map(plain)
  return v
}

function relayFromJson (m) {
  const caps = (c) => makeCaps({ compression: c })
  const peer = (p) => p === null ? null : makePeerInfo({ role: p.role, nonce: hex(p.nonce), caps: caps(p.caps) })
  switch (m.kind) {
    case 'hello': return makeHello({ token: hex(m.token), session: m.session, role: m.role, nonce: hex(m.nonce), caps: caps(m.caps), client: m.client })
    case 'welcome': return makeWelcome({ ack_nonce: hex(m.ack_nonce), server_nonce: hex(m.server_nonce), features: BigInt(m.features), heartbeat_s: m.heartbeat_s, max_frame: m.max_frame, resume_grace_s: m.resume_grace_s, peer: peer(m.peer) })
    case 'peer': return makePeerEvent({ event: m.event, role: m.role, nonce: hex(m.nonce), caps: caps(m.caps) })
    case 'close': return makeClose({ code: m.code, reason: m.reason, reconnect_in_ms: m.reconnect_in_ms })
  }
  throw new Error(`unknown kind ${m.kind}`)
}

function handle (req) {
  switch (req.op) {
    case 'frame': {
      const { header, body } = decodeFrame(hex(req.message), { maxFrame: req.max_frame })
      return { kind: header.kind, flags: header.flags, channel: header.channel, seq: String(header.seq), body: toHex(body) }
    }
    case 'relay': {
      const frame = hex(req.message)
      const { header, body } = decodeFrame(frame, { maxFrame: 1 << 24 })
      const msg = decodeRelayMessage(header.kind, body)
      return { reencoded: toHex(relayMessage(msg)) }
    }
    case 'encode_relay':
      return { message: toHex(relayMessage(relayFromJson(req.message))) }
    case 'control': {
      const msg = decodeControl(hex(req.body), { maxSize: 1 << 24 })
      if (msg.type === 'app') return { type: 'app', value: plain(msg.data), reencoded: toHex(dumps(msg.data)) }
      return { type: msg.type, seq: String(msg.seq) }
    }
    case 'cbor': {
      const value = loads(hex(req.body), 1 << 24, 'CBOR')
      return { value: plain(value), reencoded: toHex(dumps(value)) }
    }
    case 'seal': {
      const cipher = new FrameCipher(hex(req.key))
      return { message: toHex(cipher.sealFrame(req.kind, hex(req.payload), { seq: BigInt(req.seq), channel: req.channel, flags: req.flags, maxFrame: 1 << 24 })) }
    }
    case 'open': {
      const message = hex(req.message)
      const cipher = new FrameCipher(hex(req.key))
      return { plaintext: toHex(cipher.open(message.subarray(0, 12), message.subarray(12))) }
    }
    case 'heartbeat':
      return { message: toHex(encodeFrame(2, new Uint8Array(0), { seq: BigInt(req.seq) })) }
  }
  throw new Error(`unknown op ${req.op}`)
}

await ready()
const lines = createInterface({ input: process.stdin })
for await (const line of lines) {
  let answer
  try {
    answer = { ok: true, ...handle(JSON.parse(line)) }
  } catch (err) {
    answer = { ok: false, error: err instanceof ProtocolError ? 'ProtocolError' : err.name, detail: err.message }
  }
  process.stdout.write(JSON.stringify(answer) + '\n')
}
