// The CBOR subset of docs/protocol.md ("CBOR rules for every body"), strict on input, canonical on
// output. A port of rescue/protocol/_messages.py's _check_wellformed: before cborg sees a byte, the
// walk below rejects tags, indefinite lengths, non-minimal heads, simple values other than
// false/true/null, nesting deeper than 16, declared lengths beyond the input, map keys that are
// not integers/text/bytes, duplicate keys, invalid UTF-8 and trailing bytes. cborg then decodes
// (maps as Map, so integer and byte-string keys survive) and encodes canonically (RFC 7049 §3.9:
// keys sorted by encoded length, then bytewise; shortest heads), which is what the Python
// reference emits, so both produce the same bytes for the same value.

import { decode, encode } from 'cborg'
import { ProtocolError } from './errors.js'

export const MAX_DEPTH = 16
const UTF8 = new TextDecoder('utf-8', { fatal: true })

function readHead (data, pos) {
  if (pos >= data.length) throw new ProtocolError('truncated CBOR item')
  const initial = data[pos]
  const major = initial >> 5
  const info = initial & 0x1f
  pos += 1
  if (info < 24) return [major, info, info, pos]
  if (info > 27) throw new ProtocolError('indefinite-length or reserved CBOR item')
  const size = 1 << (info - 24)
  if (pos + size > data.length) throw new ProtocolError('truncated CBOR item')
  let arg = 0n
  for (let i = 0; i < size; i++) arg = (arg << 8n) | BigInt(data[pos + i])
  if (major !== 7) {
    const floor = size === 1 ? 24n : 1n << BigInt(4 * size)
    if (arg < floor) throw new ProtocolError('non-minimal CBOR integer or length encoding')
  }
  // Lengths beyond 2**53 can never fit in a message: clamp so the comparisons below stay exact.
  const num = arg > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(arg)
  return [major, info, num, pos + size]
}

function skipItem (data, pos, depth) {
  if (depth > MAX_DEPTH) throw new ProtocolError(`CBOR nesting deeper than ${MAX_DEPTH}`)
  const [major, info, arg, after] = readHead(data, pos)
  pos = after
  switch (major) {
    case 0: case 1:
      return pos
    case 2: case 3:
      if (arg > data.length - pos) throw new ProtocolError('CBOR string longer than the message')
      if (major === 3) {
        try { UTF8.decode(data.subarray(pos, pos + arg)) } catch { throw new ProtocolError('CBOR text is not valid UTF-8') }
      }
      return pos + arg
    case 4:
      if (arg > data.length - pos) throw new ProtocolError('CBOR array longer than the message')
      for (let i = 0; i < arg; i++) pos = skipItem(data, pos, depth + 1)
      return pos
    case 5: {
      if (2 * arg > data.length - pos) throw new ProtocolError('CBOR map longer than the message')
      const seen = new Set()
      for (let i = 0; i < arg; i++) {
        if (pos >= data.length) throw new ProtocolError('truncated CBOR item')
        if (data[pos] >> 5 > 3) throw new ProtocolError('CBOR map keys must be integers, text or byte strings')
        const keyEnd = skipItem(data, pos, depth + 1)
        // Heads are minimal, so equal keys have equal encodings.
        const key = String.fromCharCode(...data.subarray(pos, keyEnd))
        if (seen.has(key)) throw new ProtocolError('duplicate key in CBOR map')
        seen.add(key)
        pos = skipItem(data, keyEnd, depth + 1)
      }
      return pos
    }
    case 6:
      throw new ProtocolError('CBOR tags are not allowed')
    default:
      // false, true, null; half/single/double floats
      if (info === 20 || info === 21 || info === 22 || info === 25 || info === 26 || info === 27) return pos
      throw new ProtocolError(`CBOR simple value ${arg} is not allowed`)
  }
}

/** Throws ProtocolError unless `data` is exactly one well-formed item of the subset. */
export function checkWellformed (data) {
  const end = skipItem(data, 0, 1)
  if (end !== data.length) throw new ProtocolError(`${data.length - end} trailing bytes after the CBOR item`)
}

const DECODE_OPTIONS = {
  useMaps: true,
  rejectDuplicateMapKeys: true,
  allowIndefinite: false,
  allowUndefined: false,
  strict: false, // minimality is checked above, for integers and lengths only (as in Python)
  allowBigInt: true,
  allowInfinity: true,
  allowNaN: true
}

/**
 * Decode one strictly well-formed item of at most `maxSize` bytes (maps come back as Map,
 * integers above 2**53 - 1 as BigInt, byte strings as Uint8Array).
 */
export function loads (body, maxSize, what) {
  if (!(body instanceof Uint8Array)) throw new ProtocolError(`${what} body must be bytes`)
  if (body.length > maxSize) throw new ProtocolError(`${what} body of ${body.length} bytes exceeds ${maxSize}`)
  checkWellformed(body)
  try {
    return decode(body, DECODE_OPTIONS)
  } catch (err) {
    throw new ProtocolError(`${what} body is not valid CBOR: ${err.message}`)
  }
}

// cborg's own key order puts the major type first; RFC 7049 §3.9 sorts by the whole encoded key,
// length first, then bytewise (so "" (60) comes before 24 (18 18)). We sort every map ourselves on
// the encoded keys, then let cborg keep that order (a stable sort with a constant comparator).
const KEEP_ORDER = { mapSorter: () => 0 }

function compareBytes (a, b) {
  if (a.length !== b.length) return a.length - b.length
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] - b[i]
  return 0
}

function canonical (value) {
  if (value instanceof Uint8Array || value === null || typeof value !== 'object') return value
  if (Array.isArray(value)) return value.map(canonical)
  const entries = value instanceof Map ? [...value] : Object.entries(value)
  const keyed = entries.map(([k, v]) => [encode(k), k, canonical(v)])
  keyed.sort((x, y) => compareBytes(x[0], y[0]))
  return new Map(keyed.map(([, k, v]) => [k, v]))
}

/** Canonical CBOR (RFC 7049 §3.9), as the Python reference writes it. */
export function dumps (value) {
  return encode(canonical(value), KEEP_ORDER)
}

/** A decoded map's value for a text key (Map or plain object). */
export function field (map, key) {
  return map.get(key)
}
