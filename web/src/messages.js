// CBOR bodies of the relay-level messages (HELLO, WELCOME, PEER, CLOSE) and of the transport
// CONTROL messages (ack, resume), with the validation rules of rescue/protocol/_messages.py.
// Messages are plain frozen objects; make*() validates (throws RangeError), decode*() parses
// strictly (throws ProtocolError only), encode*() returns canonical CBOR, *Message() header + body.

import { dumps, loads } from './cbor.js'
import { ProtocolError } from './errors.js'
import { DEFAULT_MAX_FRAME, Flags, Kind, MAX_SEQ, VERSION, encodeFrame } from './frames.js'

export const NONCE_SIZE = 16
export const MAX_SESSION_LEN = 128
export const MAX_TOKEN_SIZE = 2048
export const MAX_CLIENT_LEN = 128
export const MAX_COMPRESSION_NAMES = 8
export const MAX_CLOSE_REASON_BYTES = 123
export const MAX_RECONNECT_IN_MS = 3_600_000
export const MAX_HELLO_BODY = 4096
export const MAX_WELCOME_BODY = 2048
export const MAX_PEER_BODY = 1024
export const MAX_CLOSE_BODY = 512
export const HEARTBEAT_S_RANGE = [1, 3600]
export const RESUME_GRACE_S_RANGE = [0, 86_400]
export const MAX_FRAME_RANGE = [1024, 16 * 1024 * 1024]
export const CLOSE_CODE_RANGE = [1000, 4999]
export const SESSION_ID_RE = /^[A-Za-z0-9._:-]{1,128}$/
const COMPRESSION_RE = /^[A-Za-z0-9._-]{1,32}$/
const PRINTABLE_RE = /^[\x20-\x7e]*$/
const ROLES = ['host', 'guest']
const PEER_EVENTS = ['joined', 'left', 'rejoined']
const UTF8 = new TextEncoder()

// ------------------------------------------------------------------------------ field checks

function uint (value, name, lo = 0, hi = MAX_SEQ) {
  const ok = (typeof value === 'number' && Number.isInteger(value)) || typeof value === 'bigint'
  if (!ok) throw new RangeError(`${name} must be an integer, not ${typeName(value)}`)
  if (BigInt(value) < BigInt(lo) || BigInt(value) > BigInt(hi)) throw new RangeError(`${name} ${value} is outside [${lo}, ${hi}]`)
  return value
}

function bytes (value, name, { exact, hi } = {}) {
  if (!(value instanceof Uint8Array)) throw new RangeError(`${name} must be a byte string, not ${typeName(value)}`)
  if (exact !== undefined && value.length !== exact) throw new RangeError(`${name} must be ${exact} bytes, not ${value.length}`)
  if (hi !== undefined && !(value.length >= 1 && value.length <= hi)) throw new RangeError(`${name} must be 1 to ${hi} bytes, not ${value.length}`)
  return value
}

function text (value, name) {
  if (typeof value !== 'string') throw new RangeError(`${name} must be a text string, not ${typeName(value)}`)
  return value
}

function role (value, name = 'role') {
  text(value, name)
  if (!ROLES.includes(value)) throw new RangeError(`${name} must be 'host' or 'guest', not '${value.slice(0, 16)}'`)
  return value
}

function version (value) {
  uint(value, 'v')
  if (Number(value) !== VERSION) throw new RangeError(`unsupported message version ${value}`)
  return VERSION
}

function typeName (value) {
  if (value === null) return 'null'
  if (value instanceof Uint8Array) return 'bytes'
  if (value instanceof Map) return 'map'
  if (Array.isArray(value)) return 'list'
  return typeof value
}

function fields (obj, what) {
  if (!(obj instanceof Map)) throw new ProtocolError(`${what} body must be a CBOR map, not ${typeName(obj)}`)
  for (const key of obj.keys()) {
    if (typeof key !== 'string') throw new ProtocolError(`${what} map keys must be text strings`)
  }
  return obj
}

function take (map, key, what) {
  if (!map.has(key)) throw new ProtocolError(`${what} is missing '${key}'`)
  return map.get(key)
}

function build (what, make) {
  try {
    return make()
  } catch (err) {
    if (err instanceof RangeError) throw new ProtocolError(`invalid ${what}: ${err.message}`)
    throw err
  }
}

// ---------------------------------------------------------------------------------- messages

export function makeCaps ({ compression = [] } = {}) {
  if (!Array.isArray(compression)) throw new RangeError('caps.compression must be a list of names')
  if (compression.length > MAX_COMPRESSION_NAMES) throw new RangeError(`caps.compression lists more than ${MAX_COMPRESSION_NAMES} names`)
  for (const name of compression) {
    if (!COMPRESSION_RE.test(text(name, 'compression name'))) throw new RangeError(`bad compression name '${name.slice(0, 40)}'`)
  }
  if (new Set(compression).size !== compression.length) throw new RangeError('caps.compression lists a name twice')
  return Object.freeze({ compression: Object.freeze([...compression]) })
}

function capsFromCbor (value) {
  const f = fields(value, 'caps')
  const names = take(f, 'compression', 'caps')
  if (!Array.isArray(names)) throw new ProtocolError('caps.compression must be a list')
  return build('caps', () => makeCaps({ compression: names }))
}

const capsToCbor = (caps) => ({ compression: [...caps.compression] })

export function makePeerInfo ({ role: r, nonce, caps = makeCaps() }) {
  return Object.freeze({ role: role(r), nonce: bytes(nonce, 'nonce', { exact: NONCE_SIZE }), caps })
}

function peerInfoFromCbor (value) {
  const f = fields(value, 'peer')
  const r = take(f, 'role', 'peer')
  const nonce = take(f, 'nonce', 'peer')
  const caps = capsFromCbor(take(f, 'caps', 'peer'))
  return build('peer', () => makePeerInfo({ role: r, nonce, caps }))
}

const peerInfoToCbor = (p) => ({ role: p.role, nonce: p.nonce, caps: capsToCbor(p.caps) })

export function makeHello ({ token, session, role: r, nonce, caps = makeCaps(), client = '', v = VERSION }) {
  version(v)
  bytes(token, 'token', { hi: MAX_TOKEN_SIZE })
  if (!SESSION_ID_RE.test(text(session, 'session'))) throw new RangeError(`session id must be 1-${MAX_SESSION_LEN} chars of [A-Za-z0-9._:-]`)
  role(r)
  bytes(nonce, 'nonce', { exact: NONCE_SIZE })
  text(client, 'client')
  if (client.length > MAX_CLIENT_LEN || !PRINTABLE_RE.test(client)) throw new RangeError(`client must be at most ${MAX_CLIENT_LEN} printable ASCII chars`)
  return Object.freeze({ kind: 'hello', v: VERSION, token, session, role: r, nonce, caps, client })
}

export function encodeHello (h) {
  return dumps({ v: h.v, token: h.token, session: h.session, role: h.role, nonce: h.nonce, caps: capsToCbor(h.caps), client: h.client })
}

export function decodeHello (body) {
  const f = fields(loads(body, MAX_HELLO_BODY, 'HELLO'), 'HELLO')
  const values = {}
  for (const k of ['v', 'token', 'session', 'role', 'nonce', 'caps', 'client']) values[k] = take(f, k, 'HELLO')
  values.caps = capsFromCbor(values.caps)
  return build('HELLO', () => makeHello(values))
}

export function makeWelcome ({
  ack_nonce: ackNonce, server_nonce: serverNonce, features = 0, heartbeat_s: heartbeatS = 15,
  max_frame: maxFrame = DEFAULT_MAX_FRAME, resume_grace_s: resumeGraceS = 30, peer = null, v = VERSION
}) {
  version(v)
  bytes(ackNonce, 'ack_nonce', { exact: NONCE_SIZE })
  bytes(serverNonce, 'server_nonce', { exact: NONCE_SIZE })
  uint(features, 'features')
  uint(heartbeatS, 'heartbeat_s', ...HEARTBEAT_S_RANGE)
  uint(maxFrame, 'max_frame', ...MAX_FRAME_RANGE)
  uint(resumeGraceS, 'resume_grace_s', ...RESUME_GRACE_S_RANGE)
  return Object.freeze({
    kind: 'welcome', v: VERSION, ack_nonce: ackNonce, server_nonce: serverNonce, features,
    heartbeat_s: heartbeatS, max_frame: maxFrame, resume_grace_s: resumeGraceS, peer
  })
}

export function encodeWelcome (w) {
  return dumps({
    v: w.v,
    ack_nonce: w.ack_nonce,
    server_nonce: w.server_nonce,
    features: w.features,
    heartbeat_s: w.heartbeat_s,
    max_frame: w.max_frame,
    resume_grace_s: w.resume_grace_s,
    peer: w.peer === null ? null : peerInfoToCbor(w.peer)
  })
}

export function decodeWelcome (body) {
  const f = fields(loads(body, MAX_WELCOME_BODY, 'WELCOME'), 'WELCOME')
  const values = {}
  for (const k of ['v', 'ack_nonce', 'server_nonce', 'features', 'heartbeat_s', 'max_frame', 'resume_grace_s']) {
    values[k] = take(f, k, 'WELCOME')
  }
  const rawPeer = take(f, 'peer', 'WELCOME')
  values.peer = rawPeer === null ? null : peerInfoFromCbor(rawPeer)
  return build('WELCOME', () => makeWelcome(values))
}

export function makePeerEvent ({ event, role: r, nonce, caps = makeCaps() }) {
  text(event, 'event')
  if (!PEER_EVENTS.includes(event)) throw new RangeError(`event must be one of joined, left, rejoined, not '${event.slice(0, 16)}'`)
  role(r)
  bytes(nonce, 'nonce', { exact: NONCE_SIZE })
  return Object.freeze({ kind: 'peer', event, role: r, nonce, caps, info: makePeerInfo({ role: r, nonce, caps }) })
}

export function encodePeerEvent (p) {
  return dumps({ event: p.event, role: p.role, nonce: p.nonce, caps: capsToCbor(p.caps) })
}

export function decodePeerEvent (body) {
  const f = fields(loads(body, MAX_PEER_BODY, 'PEER'), 'PEER')
  const event = take(f, 'event', 'PEER')
  const r = take(f, 'role', 'PEER')
  const nonce = take(f, 'nonce', 'PEER')
  const caps = capsFromCbor(take(f, 'caps', 'PEER'))
  return build('PEER', () => makePeerEvent({ event, role: r, nonce, caps }))
}

export function makeClose ({ code, reason = '', reconnect_in_ms: reconnectInMs = null }) {
  uint(code, 'code', ...CLOSE_CODE_RANGE)
  if (UTF8.encode(text(reason, 'reason')).length > MAX_CLOSE_REASON_BYTES) {
    throw new RangeError(`reason is longer than ${MAX_CLOSE_REASON_BYTES} UTF-8 bytes`)
  }
  if (reconnectInMs !== null) {
    uint(reconnectInMs, 'reconnect_in_ms', 0, MAX_RECONNECT_IN_MS)
  } else if (Number(code) === 1012) {
    throw new RangeError('a SERVER_SHUTDOWN close must carry reconnect_in_ms')
  }
  return Object.freeze({ kind: 'close', code: Number(code), reason, reconnect_in_ms: reconnectInMs === null ? null : Number(reconnectInMs) })
}

export function encodeClose (c) {
  const body = { code: c.code, reason: c.reason }
  if (c.reconnect_in_ms !== null) body.reconnect_in_ms = c.reconnect_in_ms
  return dumps(body)
}

export function decodeClose (body) {
  const f = fields(loads(body, MAX_CLOSE_BODY, 'CLOSE'), 'CLOSE')
  const code = take(f, 'code', 'CLOSE')
  const reason = take(f, 'reason', 'CLOSE')
  const reconnect = f.has('reconnect_in_ms') ? f.get('reconnect_in_ms') : null
  return build('CLOSE', () => makeClose({ code, reason, reconnect_in_ms: reconnect }))
}

const RELAY = {
  [Kind.HELLO]: [encodeHello, decodeHello],
  [Kind.WELCOME]: [encodeWelcome, decodeWelcome],
  [Kind.PEER]: [encodePeerEvent, decodePeerEvent],
  [Kind.CLOSE]: [encodeClose, decodeClose]
}
const KIND_OF = { hello: Kind.HELLO, welcome: Kind.WELCOME, peer: Kind.PEER, close: Kind.CLOSE }

/** Decode the body of a HELLO, WELCOME, PEER or CLOSE by its header's kind. */
export function decodeRelayMessage (kind, body) {
  const entry = RELAY[kind]
  if (entry === undefined) throw new ProtocolError(`kind ${kind} is not a relay-level message`)
  return entry[1](body)
}

/** Header + body of a relay-level message, ready to send as one binary WebSocket message. */
export function relayMessage (msg) {
  const kind = KIND_OF[msg.kind]
  return encodeFrame(kind, RELAY[kind][0](msg))
}

// ------------------------------------------------------------------- transport CONTROL bodies

export function encodeAck (seq) { return dumps(new Map([['ack', uint(seq, 'ack')]])) }
export function encodeResume (seq) { return dumps(new Map([['resume', uint(seq, 'resume')]])) }

/** Canonical plaintext of an application CONTROL map (a Map or a plain object). */
export function encodeAppControl (data) {
  const map = data instanceof Map ? data : new Map(Object.entries(data))
  if (map.has('ack') || map.has('resume')) throw new RangeError("'ack' and 'resume' are reserved for transport control")
  return dumps(map)
}

/**
 * Decode a decrypted CONTROL plaintext: {type: 'ack'|'resume', seq} or {type: 'app', data: Map}.
 * With `flags`, check the pairing: transport messages UNSEQUENCED, application control not.
 */
export function decodeControl (body, { flags = null, maxSize = DEFAULT_MAX_FRAME } = {}) {
  const value = loads(body, maxSize, 'CONTROL')
  if (!(value instanceof Map)) throw new ProtocolError(`CONTROL body must be a CBOR map, not ${typeName(value)}`)
  let msg
  if (value.has('ack') || value.has('resume')) {
    if (value.size !== 1) throw new ProtocolError('a transport CONTROL map has exactly one key')
    const [[key, seq]] = value.entries()
    build('CONTROL', () => uint(seq, key))
    msg = Object.freeze({ type: key, seq })
  } else {
    msg = Object.freeze({ type: 'app', data: value })
  }
  if (flags !== null) {
    const unsequenced = Boolean(flags & Flags.UNSEQUENCED)
    if (unsequenced !== (msg.type !== 'app')) {
      throw new ProtocolError('ack/resume must be UNSEQUENCED and application control must be sequenced')
    }
  }
  return msg
}
