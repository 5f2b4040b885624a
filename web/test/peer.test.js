// BrowserPeer (the WebSocket shell) against a scripted relay: fake WebSocket and fetch, an
// injected clock and ticker, node's mock timers for the backoff sleeps. Checks the close-code
// policy end to end: SERVER_SHUTDOWN waits reconnect_in_ms, REPLACED stops, an abnormal close
// backs off with full jitter, silence past 3 x heartbeat_s reconnects, a guardrail refusal stops.
import assert from 'node:assert/strict'
import { afterEach, before, beforeEach, mock, test } from 'node:test'
import { derivePsk, ready } from '../src/crypto.js'
import { decodeFrame } from '../src/frames.js'
import { decodeHello, makeClose, makeWelcome, relayMessage } from '../src/messages.js'
import { BrowserPeer } from '../src/peer.js'
import { BackoffPolicy } from '../src/policy.js'

let psk
before(async () => {
  await ready()
  psk = derivePsk('pw', 'shell-test')
})
beforeEach(() => mock.timers.enable({ apis: ['setTimeout'] }))
afterEach(() => mock.timers.reset())

const settle = () => new Promise((resolve) => setImmediate(resolve))

class FakeSocket {
  static all = []
  constructor (url) {
    this.url = url
    this.sent = []
    this.readyState = 0
    this.closedWith = null
    FakeSocket.all.push(this)
  }

  send (data) { this.sent.push(data) }
  close (code, reason) { this.closedWith ??= { code, reason }; this.readyState = 3 }
  // the relay's side
  open () { this.readyState = 1; this.onopen() }
  deliver (bytes) { this.onmessage({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length) }) }
  welcome (fields = {}) {
    const hello = decodeHello(decodeFrame(this.sent[0]).body)
    this.deliver(relayMessage(makeWelcome({ ack_nonce: hello.nonce, server_nonce: new Uint8Array(16), ...fields })))
  }

  drop (code = 1006) { this.readyState = 3; this.onclose({ code, reason: '' }) }
}

function harness ({ tokenAnswer = null } = {}) {
  FakeSocket.all = []
  const clock = { now: 0 }
  let tick = null
  const fetches = []
  const fetchImpl = async (url, init) => {
    fetches.push({ url, body: JSON.parse(init.body), headers: init.headers })
    const answer = tokenAnswer ?? { status: 200, body: { token: 'oQEC', relay_url: 'ws://relay.test/v1/connect', expires_at: 1 } }
    return { ok: answer.status === 200, status: answer.status, json: async () => answer.body }
  }
  const peer = new BrowserPeer({
    api: 'http://api.test/', sessionId: 'shell-test', psk, WebSocketImpl: FakeSocket, fetchImpl,
    clock: () => clock.now, ticker: (fn) => { tick = fn; return () => { tick = null } },
    backoff: new BackoffPolicy({ random: () => 1 }) // the top of every window: deterministic
  })
  const states = []
  peer.addEventListener('state', (e) => states.push(e.detail))
  return { peer, clock, states, fetches, tick: () => tick?.(), sockets: FakeSocket.all }
}

test('token request, HELLO on open, WELCOME; SERVER_SHUTDOWN waits reconnect_in_ms', async () => {
  const h = harness()
  await h.peer.start()
  await settle()
  assert.equal(h.fetches[0].url, 'http://api.test/v1/fallback/token')
  assert.deepEqual(h.fetches[0].body, { session_id: 'shell-test', role: 'guest', cohort_id: 'dev', client_version: 'rescue-web/0.1', telemetry_opt_in: false })
  assert.equal(h.fetches[0].headers['content-type'], 'application/json')
  const ws = h.sockets[0]
  assert.equal(ws.url, 'ws://relay.test/v1/connect')
  ws.open()
  assert.equal(decodeHello(decodeFrame(ws.sent[0]).body).role, 'guest')
  ws.welcome()
  assert.equal(h.states.at(-1).state, 'waiting')
  ws.deliver(relayMessage(makeClose({ code: 1012, reason: 'draining', reconnect_in_ms: 2500 })))
  await settle()
  assert.deepEqual([h.states.at(-1).state, h.states.at(-1).delayS], ['reconnecting', 2.5])
  mock.timers.tick(2499)
  await settle()
  assert.equal(h.sockets.length, 1)
  mock.timers.tick(1)
  await settle()
  await settle()
  assert.equal(h.fetches.length, 2) // a fresh token first
  assert.equal(h.sockets.length, 2)
})

test('REPLACED stops for good', async () => {
  const h = harness()
  await h.peer.start()
  await settle()
  h.sockets[0].open()
  h.sockets[0].welcome()
  h.sockets[0].deliver(relayMessage(makeClose({ code: 4011, reason: 'replaced' })))
  await settle()
  assert.deepEqual([h.states.at(-1).state, h.states.at(-1).code], ['closed', 4011])
  mock.timers.tick(60_000)
  await settle()
  assert.equal(h.sockets.length, 1)
})

test('an abnormal close backs off with full jitter, growing, reset by a WELCOME', async () => {
  const h = harness()
  await h.peer.start()
  await settle()
  const delays = []
  for (let i = 0; i < 3; i++) {
    h.sockets.at(-1).drop(1006) // no WELCOME: the attempt counts as failed
    await settle()
    delays.push(h.states.at(-1).delayS)
    mock.timers.tick(delays.at(-1) * 1000)
    await settle()
    await settle()
  }
  assert.deepEqual(delays, [0.25, 0.5, 1])
  h.sockets.at(-1).open()
  h.sockets.at(-1).welcome()
  h.sockets.at(-1).drop(1006)
  await settle()
  assert.equal(h.states.at(-1).delayS, 0.25)
})

test('heartbeats every heartbeat_s, and silence past 3 x heartbeat_s reconnects', async () => {
  const h = harness()
  await h.peer.start()
  await settle()
  const ws = h.sockets[0]
  ws.open()
  ws.welcome({ heartbeat_s: 5 })
  const sentBefore = ws.sent.length
  h.clock.now = 5
  h.tick()
  assert.equal(ws.sent.length, sentBefore + 1)
  assert.equal(decodeFrame(ws.sent.at(-1)).header.kind, 0x02)
  h.clock.now = 15
  h.tick()
  await settle()
  assert.equal(h.states.at(-1).state, 'reconnecting')
  assert.match(h.states.at(-1).reason, /no message from the relay/)
  assert.notEqual(ws.closedWith, null)
})

test('a guardrail refusal of the token request stops with the reason', async () => {
  const h = harness({ tokenAnswer: { status: 403, body: { error: 'fallback_paused', detail: 'paused' } } })
  await h.peer.start()
  await h.peer.done
  const last = h.states.at(-1)
  assert.equal(last.state, 'closed')
  assert.equal(last.error.name, 'TokenRefused')
  assert.equal(last.error.error, 'fallback_paused')
  assert.equal(h.sockets.length, 0)
})
