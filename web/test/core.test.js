// PeerCore driven through a small in-memory relay (pairing, PEER events, forwarding in order,
// losing what is in flight when a connection dies): lossless resume, acks, the wrong-passphrase
// path, and the close-code policy with its backoff.
import assert from 'node:assert/strict'
import { before, test } from 'node:test'
import { PeerCore } from '../src/core.js'
import { derivePsk, ready } from '../src/crypto.js'
import { Kind, decodeFrame } from '../src/frames.js'
import { makeCaps, makePeerEvent, makePeerInfo, makeWelcome, relayMessage, decodeHello } from '../src/messages.js'
import { BackoffPolicy, policyFor } from '../src/policy.js'

const SESSION = 'core-test'
let psk
let wrongPsk
before(async () => {
  await ready()
  psk = derivePsk('correct horse', SESSION)
  wrongPsk = derivePsk('wrong horse', SESSION)
})

// A seeded source of nonces, so runs are reproducible.
function seeded (seed) {
  let x = seed
  return (n) => Uint8Array.from({ length: n }, () => { x = (x * 1103515245 + 12345) & 0x7fffffff; return x & 0xff })
}

/** Two cores and a relay: connections, pairing and in-order forwarding, like the real relay. */
class World {
  constructor (hostPsk = psk, guestPsk = psk) {
    this.now = 0
    this.peers = {
      host: new PeerCore({ psk: hostPsk, sessionId: SESSION, role: 'host', random: seeded(1) }),
      guest: new PeerCore({ psk: guestPsk, sessionId: SESSION, role: 'guest', random: seeded(2) })
    }
    this.nonce = { host: null, guest: null }
    this.inbox = { host: [], guest: [] }
    this.got = { host: [], guest: [] }
  }

  other (role) { return role === 'host' ? 'guest' : 'host' }

  connect (role) {
    const core = this.peers[role]
    const hello = decodeHello(decodeFrame(core.connect(new Uint8Array([1]))).body)
    const partner = this.other(role)
    const rejoin = this.nonce[role] !== null
    this.inbox[role] = []
    this.nonce[role] = hello.nonce
    const peer = this.nonce[partner] && { role: partner, nonce: this.nonce[partner], caps: makeCaps() }
    this.inbox[role].push(relayMessage(makeWelcome({ ack_nonce: hello.nonce, server_nonce: new Uint8Array(16), peer: peer ? makePeerInfo(peer) : null })))
    if (this.nonce[partner]) {
      this.inbox[partner].push(relayMessage(makePeerEvent({ event: rejoin ? 'rejoined' : 'joined', role, nonce: hello.nonce })))
    }
  }

  drop (role) {
    // Everything in flight to and from this connection is lost.
    this.peers[role].connectionLost()
    this.inbox[role] = []
    this.inbox[this.other(role)].push(relayMessage(makePeerEvent({ event: 'left', role, nonce: this.nonce[role] })))
    this.nonce[role] = null
  }

  pump () {
    for (let round = 0; round < 1000; round++) {
      let moved = false
      for (const role of ['host', 'guest']) {
        const core = this.peers[role]
        for (const m of core.dataToSend()) {
          moved = true
          if (this.nonce[this.other(role)] && core.connected) this.inbox[this.other(role)].push(m)
        }
        while (this.inbox[role].length) {
          moved = true
          for (const e of core.receive(this.inbox[role].shift(), this.now)) {
            if (e.type === 'data') this.got[role].push(...e.data)
          }
        }
      }
      if (!moved) return
    }
    throw new Error('no quiescence')
  }

  tick (seconds) {
    this.now += seconds
    for (const core of Object.values(this.peers)) if (core.connected) core.poll(this.now)
    this.pump()
  }
}

test('data both ways, in order, acknowledged', () => {
  const w = new World()
  w.connect('host')
  w.peers.host.sendData(0, Uint8Array.of(1, 2, 3)) // buffered before the guest comes
  w.connect('guest')
  w.pump()
  w.peers.guest.sendData(1, Uint8Array.of(9))
  w.pump()
  assert.deepEqual(w.got.guest, [1, 2, 3])
  assert.deepEqual(w.got.host, [9])
  w.tick(1.5)
  assert.ok(w.peers.host.allAcked && w.peers.guest.allAcked)
})

test('lossless resume across connection loss of either side, many times', () => {
  const w = new World()
  w.connect('host')
  w.connect('guest')
  w.pump()
  const sent = { host: [], guest: [] }
  let byte = 0
  for (let round = 0; round < 40; round++) {
    for (const role of ['host', 'guest']) {
      const data = Uint8Array.from({ length: 1 + (round % 7) }, () => (byte++ & 0xff))
      w.peers[role].sendData(0, data)
      sent[role].push(...data)
    }
    if (round % 5 === 2) w.pump() // some frames delivered...
    if (round % 3 === 0) { const r = round % 2 ? 'host' : 'guest'; w.drop(r); w.connect(r) } // ...others lost in flight
    if (round % 4 === 1) w.tick(1.1)
  }
  w.pump()
  w.tick(1.1)
  assert.deepEqual(w.got.guest, sent.host)
  assert.deepEqual(w.got.host, sent.guest)
  assert.equal(w.peers.host.sender.bufferedBytes, 0)
})

test('a wrong passphrase ends the session with INTEGRITY_ERROR', () => {
  const w = new World(psk, wrongPsk)
  w.connect('host')
  w.connect('guest')
  assert.throws(() => { for (let i = 0; i < 10; i++) w.tick(2.5) }, (err) => err.code === 4014)
})

test('heartbeats count up and come back as echoes', () => {
  const core = new PeerCore({ psk, sessionId: SESSION, role: 'guest' })
  const hello = decodeHello(decodeFrame(core.connect(new Uint8Array([1]))).body)
  core.receive(relayMessage(makeWelcome({ ack_nonce: hello.nonce, server_nonce: new Uint8Array(16) })), 0)
  const hb = core.heartbeat()
  assert.equal(decodeFrame(hb).header.kind, Kind.HEARTBEAT)
  assert.deepEqual(core.receive(hb, 1), [{ type: 'heartbeat-echo', seq: 1 }])
})

test('close-code policy and full-jitter backoff', () => {
  assert.equal(policyFor(1000).reconnect, false)
  assert.equal(policyFor(4014).reconnect, false)
  assert.deepEqual(policyFor(1012), { reconnect: true, newToken: true, backoff: 'server' })
  assert.deepEqual(policyFor(null), { reconnect: true, newToken: false, backoff: 'normal' })
  assert.deepEqual(policyFor(4999), policyFor(null))
  assert.equal(policyFor(4009).backoff, 'long')
  const top = new BackoffPolicy({ random: () => 1 })
  assert.equal(top.delay('normal', 0), 0.25)
  assert.equal(top.delay('normal', 20), 30)
  assert.equal(top.delay('long', 0), 4)
  assert.equal(top.delay('server', 3, { reconnectInMs: 2500 }), 2.5)
  assert.equal(top.delay('none', 0), 0)
  assert.equal(new BackoffPolicy({ random: () => 0 }).delay('normal', 5), 0)
  const jitter = new BackoffPolicy()
  for (let i = 0; i < 100; i++) { const d = jitter.delay('normal', 3); assert.ok(d >= 0 && d <= 2) }
})
