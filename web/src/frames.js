// The 12-byte frame header (SPEC §2) and whole-message encode/decode; the rules of
// rescue/protocol/_frames.py. `seq` is a Number while it is at most 2**53 - 1 (every seq a session
// can reach) and a BigInt above, so any u64 round-trips exactly.

import { ProtocolError } from './errors.js'

export const VERSION = 1
export const HEADER_SIZE = 12
export const DEFAULT_MAX_FRAME = 65536
export const MAX_SEQ = (1n << 64n) - 1n

export const Kind = Object.freeze({
  CONTROL: 0x00,
  DATA: 0x01,
  HEARTBEAT: 0x02,
  CLOSE: 0x03,
  HELLO: 0x10,
  WELCOME: 0x11,
  PEER: 0x12
})
export const KIND_NAMES = Object.freeze(Object.fromEntries(Object.entries(Kind).map(([k, v]) => [v, k])))

export const Flags = Object.freeze({ NONE: 0, COMPRESSED: 0x01, UNSEQUENCED: 0x02 })
const KNOWN_FLAGS = Flags.COMPRESSED | Flags.UNSEQUENCED

const isSequenced = (kind) => kind === Kind.CONTROL || kind === Kind.DATA

function seqNumber (big) {
  return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big
}

/** Parse and validate the first 12 bytes of a message; throws ProtocolError. */
export function decodeHeader (data) {
  if (data.length < HEADER_SIZE) {
    throw new ProtocolError(`message of ${data.length} bytes is shorter than the 12-byte header`)
  }
  const view = new DataView(data.buffer, data.byteOffset, HEADER_SIZE)
  const version = data[0]
  const kind = data[1]
  const flags = data[2]
  const channel = data[3]
  const seqBig = view.getBigUint64(4)
  if (version !== VERSION) throw new ProtocolError(`unsupported protocol version ${version}`)
  const name = KIND_NAMES[kind]
  if (name === undefined) throw new ProtocolError(`unknown message kind 0x${kind.toString(16).padStart(2, '0')}`)
  if (flags & ~KNOWN_FLAGS) throw new ProtocolError(`reserved flag bits set: 0x${flags.toString(16).padStart(2, '0')}`)
  if (flags && !isSequenced(kind)) throw new ProtocolError(`${name} carries no flags`)
  if (flags & Flags.UNSEQUENCED && kind !== Kind.CONTROL) throw new ProtocolError('only CONTROL may be UNSEQUENCED')
  if (channel && kind !== Kind.DATA) throw new ProtocolError(`${name} must use channel 0`)
  if (isSequenced(kind)) {
    if (seqBig === 0n) throw new ProtocolError(`${name} sequence numbers start at 1`)
  } else if (kind !== Kind.HEARTBEAT && seqBig !== 0n) {
    throw new ProtocolError(`${name} must carry seq 0`)
  }
  return { version, kind, flags, channel, seq: seqNumber(seqBig), unsequenced: Boolean(flags & Flags.UNSEQUENCED) }
}

/** Pack a header, validating it with the rules decodeHeader applies (throws RangeError). */
export function encodeHeader (kind, { flags = 0, channel = 0, seq = 0 } = {}) {
  const big = BigInt(seq)
  if (!(kind >= 0 && kind <= 0xff && flags >= 0 && flags <= 0xff && channel >= 0 && channel <= 0xff &&
        Number.isInteger(kind) && Number.isInteger(flags) && Number.isInteger(channel) &&
        big >= 0n && big <= MAX_SEQ)) {
    throw new RangeError(`kind ${kind}, flags ${flags}, channel ${channel} or seq ${seq} out of range`)
  }
  const raw = new Uint8Array(HEADER_SIZE)
  raw[0] = VERSION
  raw[1] = kind
  raw[2] = flags
  raw[3] = channel
  new DataView(raw.buffer).setBigUint64(4, big)
  try {
    decodeHeader(raw) // one set of rules for both directions
  } catch (err) {
    throw new RangeError(err.message)
  }
  return raw
}

export function concat (...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0))
  let pos = 0
  for (const p of parts) { out.set(p, pos); pos += p.length }
  return out
}

/** Header + body as one message. */
export function encodeFrame (kind, body = new Uint8Array(0), options = {}) {
  if (kind === Kind.HEARTBEAT && body.length) throw new RangeError('HEARTBEAT has an empty body')
  return concat(encodeHeader(kind, options), body)
}

/** Parse one whole message: {header, body}; throws ProtocolError. */
export function decodeFrame (message, { maxFrame = DEFAULT_MAX_FRAME } = {}) {
  if (message.length > maxFrame) {
    throw new ProtocolError(`message of ${message.length} bytes exceeds max_frame ${maxFrame}`)
  }
  const header = decodeHeader(message)
  const body = message.subarray(HEADER_SIZE)
  if (header.kind === Kind.HEARTBEAT && body.length) throw new ProtocolError('HEARTBEAT has an empty body')
  return { header, body }
}
