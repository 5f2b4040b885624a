// The thin I/O shell around PeerCore for browsers: token requests (fetch), one WebSocket at a
// time, heartbeats, liveness, the ack/resume timer, and reconnects by close-code policy with
// full-jitter backoff (docs/protocol.md "Close codes and client policy"). Everything it decides
// about the protocol, PeerCore decides; this file only moves bytes and keeps time.
//
//   const peer = new BrowserPeer({ api: location.origin, sessionId, passphrase })
//   peer.addEventListener('state', (e) => console.log(e.detail.state))
//   peer.addEventListener('data', (e) => term.write(e.detail.data))
//   await peer.start()
//   await peer.send(1, new TextEncoder().encode('ls\r'))
//
// States ('state' event, detail {state, ...}): 'deriving' (Argon2id), 'connecting', 'waiting'
// (connected, partner absent), 'connected' (partner present), 'reconnecting' ({delayS, reason,
// code}), 'closed' ({code, reason, error}) — the last one is final.

import { CLIENT_NAME, PeerCore } from './core.js'
import { derivePsk, ready } from './crypto.js'
import { BufferFull, ProtocolError } from './errors.js'
import { BackoffPolicy, CLOSE_NAMES, CloseCode, policyFor } from './policy.js'

export const TOKEN_PATH = '/v1/fallback/token'
export const DEFAULT_COHORT = 'dev'
// SPEC §2: no inbound message for 3 x heartbeat_s means the connection is dead.
export const LIVENESS_FACTOR = 3
// No WELCOME this long after the socket opened: give up on that connection.
export const CONNECT_TIMEOUT_S = 10
// The shell's clock tick. Timers of background tabs are throttled (to once a second, and to once a
// minute after five minutes hidden in Chrome), which would starve heartbeats; the tick therefore
// comes from a dedicated Worker when one can be made (worker timers are not throttled that way).
export const TICK_MS = 250
// Stop after this long without a connection that got its WELCOME (the partner's side has given up
// by then: resume_grace_s is 30 s, pair_timeout_s 120 s).
export const GIVE_UP_AFTER_S = 120
// Browsers may only send close codes 1000 and 3000-4999 themselves.
const sendableCode = (code) => code === 1000 || (code >= 3000 && code <= 4999)
const GUARDRAIL_ERRORS = new Set(['fallback_paused', 'cohort_disabled', 'not_entitled'])

/** The token service refused for a reason retrying cannot fix (4xx, guardrails). */
export class TokenRefused extends Error {
  constructor (status, error, detail) {
    super(`token request refused: ${status} ${error}: ${detail}`)
    this.name = 'TokenRefused'
    this.status = status
    this.error = error
  }
}

function b64urlDecode (text) {
  const b64 = text.replace(/-/g, '+').replace(/_/g, '/') + '==='.slice((text.length + 3) % 4)
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))
}

/** A ticker that keeps running in background tabs: a Worker's setInterval when possible. */
export function defaultTicker (fn, ms = TICK_MS) {
  if (typeof Worker !== 'undefined' && typeof Blob !== 'undefined' && typeof URL?.createObjectURL === 'function') {
    try {
      const url = URL.createObjectURL(new Blob([`setInterval(() => postMessage(0), ${ms})`], { type: 'text/javascript' }))
      const worker = new Worker(url)
      worker.onmessage = fn
      return () => { worker.terminate(); URL.revokeObjectURL(url) }
    } catch {
      // a CSP without worker-src blob: falls back to a plain interval
    }
  }
  const id = setInterval(fn, ms)
  return () => clearInterval(id)
}

export class BrowserPeer extends EventTarget {
  /**
   * @param {object} o
   * @param {string} o.api token service base URL (same origin for the /join/ page)
   * @param {string} o.sessionId
   * @param {string} [o.passphrase] or o.psk (32 bytes)
   * @param {'host'|'guest'} [o.role]
   * @param {string} [o.cohort]
   * @param {string} [o.serviceKey] Authorization: Bearer for the token request (integrators)
   * @param {(grant) => string} [o.relayUrl] rewrite the relay URL of a grant (tests, proxies)
   * @param {number} [o.heartbeatS] send heartbeats this often instead of WELCOME.heartbeat_s (more
   *   often is always allowed)
   */
  constructor ({
    api, sessionId, passphrase = null, psk = null, role = 'guest', cohort = DEFAULT_COHORT, serviceKey = null,
    relayUrl = null, heartbeatS = null, client = CLIENT_NAME, WebSocketImpl = globalThis.WebSocket,
    fetchImpl = globalThis.fetch?.bind(globalThis), clock = () => performance.now() / 1000,
    ticker = defaultTicker, backoff = new BackoffPolicy(), giveUpAfterS = GIVE_UP_AFTER_S
  }) {
    super()
    if (passphrase === null && psk === null) throw new TypeError('give a passphrase or a psk')
    this.api = api.replace(/\/+$/, '')
    this.sessionId = sessionId
    this.role = role
    this.cohort = cohort
    this.client = client
    this._passphrase = passphrase
    this._psk = psk
    this._serviceKey = serviceKey
    this._relayUrl = relayUrl
    this._heartbeatS = heartbeatS
    this._WebSocket = WebSocketImpl
    this._fetch = fetchImpl
    this._clock = clock
    this._ticker = ticker
    this._backoff = backoff
    this._giveUpAfterS = giveUpAfterS
    this.core = null
    this.state = 'idle'
    this.closed = null
    this.heartbeatsSent = 0
    this.heartbeatEchoes = 0
    this._ws = null
    this._link = null
    this._stopTick = null
    this._stopping = null
    this._spaceWaiters = []
    this._wake = null
  }

  // --------------------------------------------------------------------------------- public

  /** Derive the key and start connecting; resolves once the connection manager runs. */
  async start () {
    if (this.core !== null) throw new Error('already started')
    await ready()
    this.#setState('deriving')
    const psk = this._psk ?? derivePsk(this._passphrase, this.sessionId)
    this._passphrase = null // not kept beyond the derivation
    // Acks fall due on the tick, so the interval is shortened by one tick: never later than 1 s.
    this.core = new PeerCore({ psk, sessionId: this.sessionId, role: this.role, client: this.client, ackInterval: 1 - TICK_MS / 1000 })
    this._stopTick = this._ticker(() => this.#tick())
    this.done = this.#manage().catch((err) => this.#finish({ code: null, reason: String(err?.message ?? err), error: err }))
  }

  get partnerPresent () { return this.core?.partnerPresent ?? false }

  /** Queue bytes on `channel` (split to frame size); waits while the replay buffer is full. */
  async send (channel, data) {
    for (let pos = 0; pos < data.length || (pos === 0 && data.length === 0); ) {
      this.#raiseIfClosed()
      const chunk = data.subarray(pos, pos + this.core.maxPayload)
      try {
        this.core.sendData(channel, chunk)
      } catch (err) {
        if (!(err instanceof BufferFull)) throw err
        await new Promise((resolve) => this._spaceWaiters.push(resolve))
        continue
      }
      pos += chunk.length
      this.#flush()
      if (data.length === 0) break
    }
  }

  /** Queue an application CONTROL map, in order with the data. */
  async sendControl (map) {
    for (;;) {
      this.#raiseIfClosed()
      try {
        this.core.sendControl(map)
        this.#flush()
        return
      } catch (err) {
        if (!(err instanceof BufferFull)) throw err
        await new Promise((resolve) => this._spaceWaiters.push(resolve))
      }
    }
  }

  /** End the session for both peers (CLOSE NORMAL), after a last ack. */
  close (code = CloseCode.NORMAL, reason = '') {
    if (this.closed !== null) return
    this._stopping = { code, reason, local: true }
    if (this._link !== null) {
      this.core.flushAck()
      this.#closeLink(this._link, { code, reason, local: true })
    } else {
      this._wake?.()
    }
  }

  // ---------------------------------------------------------------------------- internals

  #emit (type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })) }

  #setState (state, extra = {}) {
    this.state = state
    this.#emit('state', { state, ...extra })
  }

  #raiseIfClosed () {
    if (this.closed !== null) throw new ProtocolError(`session closed: ${this.closed.reason}`, this.closed.code ?? 4010)
  }

  #finish (closed) {
    if (this.closed !== null) return
    this.closed = closed
    this._stopTick?.()
    for (const wake of this._spaceWaiters.splice(0)) wake()
    this.#setState('closed', closed)
  }

  async #sleep (seconds) {
    await new Promise((resolve) => {
      const id = setTimeout(resolve, seconds * 1000)
      this._wake = () => { clearTimeout(id); resolve() }
    })
    this._wake = null
  }

  async #fetchToken () {
    const headers = { 'content-type': 'application/json' }
    if (this._serviceKey) headers.authorization = `Bearer ${this._serviceKey}`
    const body = JSON.stringify({
      session_id: this.sessionId, role: this.role, cohort_id: this.cohort, client_version: this.client, telemetry_opt_in: false
    })
    let response
    try {
      response = await this._fetch(this.api + TOKEN_PATH, { method: 'POST', headers, body, credentials: 'omit', cache: 'no-store' })
    } catch (err) {
      return { retry: true, reason: `token service unreachable: ${err.message}` }
    }
    let answer = null
    try { answer = await response.json() } catch { /* not JSON: judged by the status below */ }
    if (response.ok && answer && typeof answer.token === 'string' && typeof answer.relay_url === 'string') {
      return { token: b64urlDecode(answer.token), relayUrl: answer.relay_url, expiresAt: answer.expires_at }
    }
    const error = answer?.error ?? 'bad_answer'
    if (response.status >= 500 || response.ok) return { retry: true, reason: `token service unavailable: ${error}` }
    throw new TokenRefused(response.status, error, answer?.detail ?? '')
  }

  async #manage () {
    let attempt = 0
    let failingSince = null
    while (this._stopping === null) {
      this.#setState('connecting', { attempt })
      const grant = await this.#fetchToken()
      let outcome
      let welcomed = false
      if (grant.retry) {
        outcome = { code: null, reason: grant.reason }
      } else {
        [outcome, welcomed] = await this.#connectOnce(grant)
      }
      if (outcome.local || this._stopping !== null) {
        this.#finish({ code: outcome.code ?? CloseCode.NORMAL, reason: outcome.reason || 'closed', local: true })
        return
      }
      const policy = policyFor(outcome.code)
      if (!policy.reconnect) {
        this.#finish({ code: outcome.code, reason: outcome.reason, local: false })
        return
      }
      const now = this._clock()
      if (welcomed) { attempt = 0; failingSince = null } else if (failingSince === null) failingSince = now
      if (failingSince !== null && now - failingSince >= this._giveUpAfterS) {
        this.#finish({ code: outcome.code, reason: `gave up: ${outcome.reason}`, local: false })
        return
      }
      const delayS = this._backoff.delay(policy.backoff, attempt, { reconnectInMs: outcome.reconnectInMs ?? null })
      attempt += 1
      this.#setState('reconnecting', { delayS, reason: outcome.reason, code: outcome.code })
      await this.#sleep(delayS)
    }
    this.#finish({ code: this._stopping.code, reason: this._stopping.reason || 'closed', local: true })
  }

  #connectOnce (grant) {
    return new Promise((resolve) => {
      const url = this._relayUrl ? this._relayUrl(grant) : grant.relayUrl
      let ws
      try {
        ws = new this._WebSocket(url)
      } catch (err) {
        resolve([{ code: null, reason: `cannot open ${url}: ${err.message}` }, false])
        return
      }
      ws.binaryType = 'arraybuffer'
      const link = {
        ws, outcome: null, welcomed: false, openedAt: this._clock(), lastInbound: this._clock(),
        lastHeartbeat: this._clock(), heartbeatS: null, resolve
      }
      this._ws = ws
      this._link = link
      ws.onopen = () => {
        if (link.outcome !== null) return
        ws.send(this.core.connect(grant.token))
        link.lastInbound = this._clock()
      }
      ws.onmessage = (event) => this.#onMessage(link, event.data)
      ws.onerror = () => {} // always followed by onclose, which carries the code
      ws.onclose = (event) => {
        const code = event.code === 1005 || event.code === 1006 ? null : event.code
        this.#endLink(link, { code, reason: event.reason || 'connection closed' })
      }
    })
  }

  #endLink (link, outcome) {
    if (link.resolve === null) return
    if (link.outcome === null) link.outcome = outcome
    const resolve = link.resolve
    link.resolve = null
    if (this._link === link) {
      this._link = null
      this._ws = null
      this.core.connectionLost()
    }
    try { link.ws.close() } catch { /* already closed */ }
    resolve([link.outcome, link.welcomed])
  }

  /** Send what is queued, CLOSE and the WebSocket close; the link ends now. */
  #closeLink (link, outcome) {
    try {
      if (link.ws.readyState === 1) {
        const final = outcome.local ? this.core.dataToSend() : []
        if (outcome.code !== null) final.push(this.core.closeMessage(outcome.code, outcome.reason.slice(0, 100)))
        for (const m of final) link.ws.send(m)
        link.ws.close(sendableCode(outcome.code) ? outcome.code : 1000, outcome.reason.slice(0, 100))
      }
    } catch { /* the socket is going away anyway */ }
    this.#endLink(link, outcome)
  }

  #onMessage (link, data) {
    if (link.resolve === null || !(data instanceof ArrayBuffer)) {
      if (!(data instanceof ArrayBuffer)) this.#closeLink(link, { code: CloseCode.PROTOCOL_ERROR, reason: 'text message from the relay' })
      return
    }
    link.lastInbound = this._clock()
    let events
    try {
      events = this.core.receive(new Uint8Array(data), this._clock())
    } catch (err) {
      if (err instanceof ProtocolError) {
        this.#closeLink(link, { code: err.code, reason: err.message })
        return
      }
      throw err
    }
    for (const event of events) {
      switch (event.type) {
        case 'welcomed':
          link.welcomed = true
          link.heartbeatS = this._heartbeatS ?? event.welcome.heartbeat_s
          this.#setState(event.welcome.peer ? 'connected' : 'waiting')
          break
        case 'peer-joined':
          this.#setState('connected', { rejoined: event.rejoined })
          break
        case 'peer-left':
          this.#setState('waiting', { left: true })
          break
        case 'data':
          this.#emit('data', { channel: event.channel, data: event.data })
          break
        case 'control':
          this.#emit('control', { data: event.data })
          break
        case 'close':
          this.#endLink(link, { code: event.code, reason: event.reason, reconnectInMs: event.reconnectInMs })
          return
        case 'heartbeat-echo':
          this.heartbeatEchoes += 1
          break
        case 'acked':
          for (const wake of this._spaceWaiters.splice(0)) wake()
          this.#emit('acked', event)
          break
        default:
          break
      }
    }
    this.#flush()
  }

  #flush () {
    const link = this._link
    if (link === null || link.ws.readyState !== 1) return
    for (const message of this.core.dataToSend()) link.ws.send(message)
  }

  #tick () {
    const link = this._link
    if (link === null || link.resolve === null) return
    const now = this._clock()
    if (!link.welcomed) {
      if (now - link.openedAt >= CONNECT_TIMEOUT_S) this.#closeLink(link, { code: null, reason: 'no WELCOME from the relay' })
      return
    }
    if (now - link.lastInbound >= LIVENESS_FACTOR * link.heartbeatS) {
      this.#closeLink(link, { code: null, reason: `no message from the relay for ${Math.round(now - link.lastInbound)} s` })
      return
    }
    if (now - link.lastHeartbeat >= link.heartbeatS && link.ws.readyState === 1) {
      link.lastHeartbeat = now
      link.ws.send(this.core.heartbeat())
      this.heartbeatsSent += 1
    }
    const deadline = this.core.nextDeadline()
    if (deadline !== null && now >= deadline) {
      this.core.poll(now)
      this.#flush()
    }
  }
}

export { CLOSE_NAMES, CloseCode }
