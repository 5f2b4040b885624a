// End-to-end encryption of SPEC §2 / docs/protocol.md "End-to-end encryption and tokens", on
// libsodium (libsodium-wrappers-sumo: Argon2id and ChaCha20-Poly1305 IETF, which WebCrypto lacks).
// HKDF-SHA256 is built from libsodium's HMAC-SHA256 so that everything stays synchronous and the
// core can stay sans-I/O (WebCrypto's HKDF is async). Call `await ready()` once before anything.

import sodiumModule from 'libsodium-wrappers-sumo'
import { ProtocolError } from './errors.js'
import { DEFAULT_MAX_FRAME, Flags, HEADER_SIZE, Kind, concat, decodeHeader, encodeHeader } from './frames.js'

export const KEY_SIZE = 32
export const PSK_SIZE = 32
export const TAG_SIZE = 16
export const PEER_NONCE_SIZE = 16
export const PSK_SALT_SIZE = 16
// libsodium "interactive" limits (SPEC §2): t = 2, m = 64 MiB, one lane.
export const ARGON2_OPSLIMIT = 2
export const ARGON2_MEMLIMIT = 67108864
const UTF8 = new TextEncoder()
const SALT_SUFFIX = UTF8.encode('beach-salt')
const FRAME_INFO_PREFIX = UTF8.encode('beach-rescue/v1/frame')

let sodium = null

/** Resolve once libsodium's WebAssembly is loaded (idempotent). */
export async function ready () {
  await sodiumModule.ready
  sodium = sodiumModule
  return sodium
}

function lib () {
  if (sodium === null) throw new Error('call `await ready()` before using the crypto functions')
  return sodium
}

/** A frame failed authentication (wrong key, changed header or body). */
export class DecryptError extends Error {
  constructor (message) { super(message); this.name = 'DecryptError' }
}

/** The first 16 bytes of BLAKE2b-512(session_id ‖ "beach-salt"). */
export function pskSalt (sessionId) {
  return lib().crypto_generichash(64, concat(UTF8.encode(sessionId), SALT_SUFFIX)).subarray(0, PSK_SALT_SIZE)
}

/** Argon2id(passphrase, pskSalt(session)), 32 bytes; ~0.1 s and 64 MiB. */
export function derivePsk (passphrase, sessionId) {
  const s = lib()
  const password = typeof passphrase === 'string' ? UTF8.encode(passphrase) : passphrase
  return s.crypto_pwhash(PSK_SIZE, password, pskSalt(sessionId), ARGON2_OPSLIMIT, ARGON2_MEMLIMIT, s.crypto_pwhash_ALG_ARGON2ID13)
}

function hmacSha256 (key, data) {
  const s = lib()
  const state = s.crypto_auth_hmacsha256_init(key)
  s.crypto_auth_hmacsha256_update(state, data)
  return s.crypto_auth_hmacsha256_final(state)
}

/** RFC 5869 HKDF with HMAC-SHA256 (extract, then expand). */
export function hkdfSha256 (ikm, salt, info, length) {
  if (length < 0 || length > 255 * 32) throw new RangeError('HKDF length out of range')
  const prk = hmacSha256(salt.length ? salt : new Uint8Array(32), ikm)
  const out = new Uint8Array(length)
  let block = new Uint8Array(0)
  for (let i = 1, pos = 0; pos < length; i++) {
    block = hmacSha256(prk, concat(block, info, Uint8Array.of(i)))
    out.set(block.subarray(0, Math.min(32, length - pos)), pos)
    pos += 32
  }
  return out
}

/** The key for frames a peer sends on one connection (the sender's role and HELLO nonce). */
export function deriveFrameKey (psk, sessionId, role, nonce) {
  if (psk.length !== PSK_SIZE) throw new RangeError(`psk must be ${PSK_SIZE} bytes, not ${psk.length}`)
  if (role !== 'host' && role !== 'guest') throw new RangeError(`role must be 'host' or 'guest', not '${role}'`)
  if (nonce.length !== PEER_NONCE_SIZE) throw new RangeError(`connection nonce must be ${PEER_NONCE_SIZE} bytes, not ${nonce.length}`)
  return hkdfSha256(psk, UTF8.encode(sessionId), concat(FRAME_INFO_PREFIX, UTF8.encode(role), nonce), KEY_SIZE)
}

/** The 12-byte AEAD nonce of a frame: u32 space ‖ u64 seq (space 1 for UNSEQUENCED). */
export function aeadNonce (header) {
  const nonce = new Uint8Array(12)
  const view = new DataView(nonce.buffer)
  view.setUint32(0, header.unsequenced ? 1 : 0)
  view.setBigUint64(4, BigInt(header.seq))
  return nonce
}

const isSealed = (kind) => kind === Kind.CONTROL || kind === Kind.DATA

/** ChaCha20-Poly1305 (IETF) for the frames of one sending connection. */
export class FrameCipher {
  #key
  constructor (key) {
    if (key.length !== KEY_SIZE) throw new RangeError(`frame key must be ${KEY_SIZE} bytes, not ${key.length}`)
    this.#key = Uint8Array.from(key)
  }

  toString () { return 'FrameCipher(<key redacted>)' }

  /** Whole sealed message: header ‖ AEAD(payload, aad = header). Throws RangeError. */
  sealFrame (kind, payload, { seq, channel = 0, flags = Flags.NONE, maxFrame = DEFAULT_MAX_FRAME }) {
    const size = HEADER_SIZE + payload.length + TAG_SIZE
    if (size > maxFrame) throw new RangeError(`sealed message of ${size} bytes exceeds max_frame ${maxFrame}`)
    if (!isSealed(kind)) throw new RangeError('only CONTROL and DATA bodies are encrypted')
    const header = encodeHeader(kind, { flags, channel, seq })
    const body = lib().crypto_aead_chacha20poly1305_ietf_encrypt(payload, header, null, aeadNonce(decodeHeader(header)), this.#key)
    return concat(header, body)
  }

  /** Authenticate and decrypt a body received under the 12 `header` bytes. */
  open (header, ciphertext) {
    if (header.length !== HEADER_SIZE) throw new ProtocolError(`header must be exactly ${HEADER_SIZE} bytes, not ${header.length}`)
    const parsed = decodeHeader(header)
    if (!isSealed(parsed.kind)) throw new ProtocolError('only CONTROL and DATA frames carry an encrypted body')
    if (ciphertext.length < TAG_SIZE) throw new DecryptError(`body of ${ciphertext.length} bytes is shorter than the tag`)
    try {
      return lib().crypto_aead_chacha20poly1305_ietf_decrypt(null, ciphertext, header, aeadNonce(parsed), this.#key)
    } catch {
      throw new DecryptError(`seq ${parsed.seq} failed authentication`)
    }
  }
}

/** Verify an Ed25519 signature (tokens; libsodium's crypto_sign_verify_detached). */
export function ed25519Verify (signature, message, publicKey) {
  return lib().crypto_sign_verify_detached(signature, message, publicKey)
}

/** 16 random bytes (HELLO nonces). */
export function randomBytes (n) {
  return lib().randombytes_buf(n)
}
