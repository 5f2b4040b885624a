// Reading fallback tokens (SPEC §3: a CWT, COSE_Sign1 with EdDSA). A browser peer never needs to
// verify its own token (the relay does), but reading `exp` tells it when to fetch a fresh one, and
// verification here is what proves tests/vectors/token.json byte for byte in a second language.

import { decode, encode } from 'cborg'
import { ed25519Verify } from './crypto.js'

const CLAIM_NAMES = { 1: 'iss', 3: 'aud', 4: 'exp', 5: 'nbf', 6: 'iat', 7: 'cti' }

/** Split a token into its COSE_Sign1 parts and claims (no signature check). */
export function parseToken (token) {
  const tags = []
  tags[18] = (decodeInner) => decodeInner()
  const item = decode(token, { useMaps: true, tags })
  if (!Array.isArray(item) || item.length !== 4) throw new RangeError('not a COSE_Sign1 structure')
  const [protectedBytes, , payload, signature] = item
  const header = decode(protectedBytes, { useMaps: true })
  const raw = decode(payload, { useMaps: true })
  const claims = {}
  for (const [key, value] of raw) claims[CLAIM_NAMES[key] ?? key] = value
  return { protectedBytes, header, payload, signature, claims, kid: header.get(4) }
}

/** The Sig_structure signed by the issuer: ["Signature1", protected, h'', payload]. */
export function sigStructure (protectedBytes, payload) {
  return encode(['Signature1', protectedBytes, new Uint8Array(0), payload])
}

/** Whether the token's signature verifies under a 32-byte Ed25519 public key. */
export function verifyTokenSignature (token, publicKey) {
  const { protectedBytes, payload, signature } = parseToken(token)
  return ed25519Verify(signature, sigStructure(protectedBytes, payload), publicKey)
}
