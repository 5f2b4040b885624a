// Every known-answer vector of tests/vectors/ (and the message examples of docs/protocol.md),
// recomputed by the browser implementation under node's test runner.
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { before, test } from 'node:test'
import {
  FrameCipher, aeadNonce, deriveFrameKey, derivePsk, hkdfSha256, pskSalt, ready
} from '../src/crypto.js'
import { decodeFrame, decodeHeader, Kind } from '../src/frames.js'
import {
  decodeClose, decodePeerEvent, decodeWelcome, decodeHello, encodeAck, encodeResume, makeCaps, makeClose,
  makeHello, makePeerEvent, makePeerInfo, makeWelcome, relayMessage
} from '../src/messages.js'
import { parseToken, sigStructure, verifyTokenSignature } from '../src/token.js'

const here = new URL('../../tests/vectors/', import.meta.url)
const crypto = JSON.parse(readFileSync(new URL('crypto.json', here)))
const token = JSON.parse(readFileSync(new URL('token.json', here)))
const hex = (s) => Uint8Array.from(Buffer.from(s, 'hex'))
const toHex = (b) => Buffer.from(b).toString('hex')
const range = (a, n) => Uint8Array.from({ length: n }, (_, i) => a + i)

before(ready)

test('psk salt and Argon2id psk', () => {
  const { passphrase, session_id: sid } = crypto.inputs
  assert.equal(toHex(pskSalt(sid)), crypto.psk_salt_hex)
  assert.equal(toHex(derivePsk(passphrase, sid)), crypto.psk_hex)
})

test('HKDF-SHA256 against RFC 5869 test cases 1 and 3', () => {
  const ikm = new Uint8Array(22).fill(0x0b)
  assert.equal(toHex(hkdfSha256(ikm, range(0, 13), range(0xf0, 10), 42)),
    '3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865')
  assert.equal(toHex(hkdfSha256(ikm, new Uint8Array(0), new Uint8Array(0), 42)),
    '8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8')
})

test('frame keys of both directions', () => {
  const psk = hex(crypto.psk_hex)
  const sid = crypto.inputs.session_id
  assert.equal(toHex(deriveFrameKey(psk, sid, 'host', hex(crypto.inputs.host_nonce_hex))), crypto.host_frame_key_hex)
  assert.equal(toHex(deriveFrameKey(psk, sid, 'guest', hex(crypto.inputs.guest_nonce_hex))), crypto.guest_frame_key_hex)
})

for (const name of ['data_frame', 'ack_frame']) {
  test(`sealed ${name} byte for byte, and opened back`, () => {
    const v = crypto[name]
    const key = hex(v.sender === 'host' ? crypto.host_frame_key_hex : crypto.guest_frame_key_hex)
    const cipher = new FrameCipher(key)
    const message = cipher.sealFrame(Kind[v.kind], hex(v.plaintext_hex), { seq: v.seq, channel: v.channel, flags: v.flags })
    assert.equal(toHex(message), v.message_hex)
    assert.equal(toHex(message.subarray(0, 12)), v.header_hex)
    assert.equal(toHex(message.subarray(12)), v.ciphertext_hex)
    assert.equal(toHex(aeadNonce(decodeHeader(message))), v.aead_nonce_hex)
    const { header, body } = decodeFrame(message)
    assert.equal(header.seq, v.seq)
    assert.equal(toHex(cipher.open(message.subarray(0, 12), body)), v.plaintext_hex)
    const tampered = Uint8Array.from(message)
    tampered[tampered.length - 1] ^= 1
    assert.throws(() => cipher.open(tampered.subarray(0, 12), tampered.subarray(12)), { name: 'DecryptError' })
  })
}

test('token: COSE_Sign1 parts, claims and Ed25519 signature', () => {
  const bytes = hex(token.token_hex)
  assert.equal(Buffer.from(bytes).toString('base64url'), token.token_b64url)
  const parsed = parseToken(bytes)
  assert.equal(toHex(parsed.protectedBytes), token.protected_hex)
  assert.equal(toHex(parsed.payload), token.payload_hex)
  assert.equal(toHex(parsed.signature), token.signature_hex)
  assert.equal(toHex(parsed.kid), token.kid_hex)
  assert.equal(parsed.header.get(1), -8)
  assert.equal(toHex(sigStructure(parsed.protectedBytes, parsed.payload)), token.sig_structure_hex)
  const c = parsed.claims
  for (const k of ['iss', 'aud', 'exp', 'nbf', 'iat', 'sid', 'role', 'cohort', 'fb']) assert.equal(c[k], token.claims[k], k)
  assert.equal(Buffer.from(c.cti).toString('base64url'), token.claims.cti)
  const publicKey = hex(token.public_key_hex)
  assert.equal(Buffer.from(publicKey).toString('base64url'), token.public_jwk.x)
  assert.ok(verifyTokenSignature(bytes, publicKey))
  const forged = Uint8Array.from(bytes)
  forged[40] ^= 1
  assert.ok(!verifyTokenSignature(forged, publicKey))
})

// docs/protocol.md examples (pinned in Python by tests/test_messages.py).
const zlib = makeCaps({ compression: ['zlib'] })
const DOC = {
  hello: '011000000000000000000000a76176016463617073a16b636f6d7072657373696f6e81647a6c696264726f6c6564686f7374656e6f6e636550000102030405060708090a0b0c0d0e0f65746f6b656e43a1010266636c69656e746d7265736375652d70792f302e316773657373696f6e6664656d6f2d31',
  welcome: '011100000000000000000000a86176016470656572f6686665617475726573006961636b5f6e6f6e636550000102030405060708090a0b0c0d0e0f696d61785f6672616d651a000100006b6865617274626561745f730f6c7365727665725f6e6f6e636550101112131415161718191a1b1c1d1e1f6e726573756d655f67726163655f73181e',
  welcomePeer: '011100000000000000000000a86176016470656572a36463617073a16b636f6d7072657373696f6e81647a6c696264726f6c65656775657374656e6f6e636550202122232425262728292a2b2c2d2e2f686665617475726573006961636b5f6e6f6e636550000102030405060708090a0b0c0d0e0f696d61785f6672616d651a000100006b6865617274626561745f730f6c7365727665725f6e6f6e636550101112131415161718191a1b1c1d1e1f6e726573756d655f67726163655f73181e',
  peer: '011200000000000000000000a46463617073a16b636f6d7072657373696f6e81647a6c696264726f6c65656775657374656576656e74666a6f696e6564656e6f6e636550202122232425262728292a2b2c2d2e2f',
  shutdown: '010300000000000000000000a364636f64651903f466726561736f6e74736572766572207368757474696e6720646f776e6f7265636f6e6e6563745f696e5f6d731909c4',
  replaced: '010300000000000000000000a264636f6465190fab66726561736f6e781e7265706c616365642062792061206e6577657220636f6e6e656374696f6e'
}

test('relay messages of docs/protocol.md, encoded and decoded', () => {
  const hello = makeHello({ token: hex('a10102'), session: 'demo-1', role: 'host', nonce: range(0, 16), caps: zlib, client: 'rescue-py/0.1' })
  const guest = makePeerInfo({ role: 'guest', nonce: range(0x20, 16), caps: zlib })
  const cases = [
    ['hello', hello, decodeHello],
    ['welcome', makeWelcome({ ack_nonce: range(0, 16), server_nonce: range(0x10, 16) }), decodeWelcome],
    ['welcomePeer', makeWelcome({ ack_nonce: range(0, 16), server_nonce: range(0x10, 16), peer: guest }), decodeWelcome],
    ['peer', makePeerEvent({ event: 'joined', role: 'guest', nonce: range(0x20, 16), caps: zlib }), decodePeerEvent],
    ['shutdown', makeClose({ code: 1012, reason: 'server shutting down', reconnect_in_ms: 2500 }), decodeClose],
    ['replaced', makeClose({ code: 4011, reason: 'replaced by a newer connection' }), decodeClose]
  ]
  for (const [name, msg, dec] of cases) {
    const wire = relayMessage(msg)
    assert.equal(toHex(wire), DOC[name], name)
    assert.equal(toHex(relayMessage(dec(wire.subarray(12)))), DOC[name], name)
  }
  assert.equal(toHex(encodeAck(64)), 'a16361636b1840')
  assert.equal(toHex(encodeResume(1000)), 'a166726573756d651903e8')
  assert.equal(toHex(encodeResume(0)), 'a166726573756d6500')
})
