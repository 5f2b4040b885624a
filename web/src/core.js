// The sans-I/O browser peer: a port of rescue/client/_core.py (PeerCore). Bytes and time in,
// events and messages out; no WebSocket, no timers, no clock. The shell (peer.js) feeds every
// inbound message to receive(message, now), writes what dataToSend() returns, calls poll(now) at
// nextDeadline(), and connectionLost() when its socket dies.
//
// Events (plain objects, `type` first):
//   {type: 'welcomed', welcome}              the relay accepted our HELLO
//   {type: 'peer-joined', peer, rejoined}    the partner connected
//   {type: 'peer-left', peer}                the partner's connection ended (may come back)
//   {type: 'data', channel, data}            application bytes, in order
//   {type: 'control', data}                  an application CONTROL Map, in order with the data
//   {type: 'close', code, reason, reconnectInMs}
//   {type: 'heartbeat-echo', seq}
//   {type: 'acked', freed}                   room in the replay buffer (wake a blocked writer)
//   {type: 'resumed', seq, retransmitted}

import { ProtocolError } from './errors.js'
import { DecryptError, FrameCipher, TAG_SIZE, deriveFrameKey, randomBytes } from './crypto.js'
import { DEFAULT_MAX_FRAME, Flags, HEADER_SIZE, KIND_NAMES, Kind, decodeFrame, encodeFrame } from './frames.js'
import {
  NONCE_SIZE, decodeControl, decodeRelayMessage, encodeAck, encodeAppControl, encodeResume,
  makeCaps, makeClose, makeHello, relayMessage
} from './messages.js'
import { Receiver, Sender, UnsequencedCounter, UnsequencedFilter } from './stream.js'

export const CLIENT_NAME = 'rescue-web/0.1'
export const FRAME_OVERHEAD = HEADER_SIZE + TAG_SIZE
// SPEC §2: "three in a row end the session with INTEGRITY_ERROR".
export const INTEGRITY_FAILURE_LIMIT = 3
export const INTEGRITY_ERROR = 4014
// While we wait for the partner's resume, ours is sent again this often (a wrong passphrase then
// ends the session with INTEGRITY_ERROR within seconds instead of both peers waiting forever).
export const RESUME_RETRY_S = 2.0
// We announce no compression: inflating needs an async API in browsers (DecompressionStream),
// and partners only compress with what both sides announced (the Python peer never compresses).
export const DEFAULT_CAPS = makeCaps({ compression: [] })

const equalBytes = (a, b) => a.length === b.length && a.every((x, i) => x === b[i])

class PartnerKey {
  constructor (cipher, nonce) {
    this.cipher = cipher
    this.nonce = nonce
    this.filter = new UnsequencedFilter()
  }
}

export class PeerCore {
  /**
   * @param {object} options
   * @param {Uint8Array} options.psk 32-byte pre-shared key (derivePsk)
   * @param {string} options.sessionId
   * @param {'host'|'guest'} options.role
   */
  constructor ({
    psk, sessionId, role, caps = DEFAULT_CAPS, client = CLIENT_NAME,
    maxBufferBytes, ackEvery, ackInterval, random = randomBytes
  }) {
    deriveFrameKey(psk, sessionId, role, new Uint8Array(NONCE_SIZE)) // validates psk and role
    this.sessionId = sessionId
    this.role = role
    this.partnerRole = role === 'host' ? 'guest' : 'host'
    this.caps = caps
    this.client = client
    this._psk = Uint8Array.from(psk)
    this._random = random
    this.sender = new Sender({ maxBufferBytes })
    this.receiver = new Receiver({ ackEvery, ackInterval })
    this.nonce = null
    this._cipher = null
    this._counter = new UnsequencedCounter()
    this.connected = false
    this.welcome = null
    this._closed = false
    this.partner = null
    this._partnerPresent = false
    this._key = null
    this._previousKey = null
    this._pendingResume = null
    this._resumeSentAt = null
    this._pendingAck = null
    this._outbox = []
    this._heartbeatSeq = 0
    this.connections = 0
    this._integrityRun = 0
    this.integrityFailures = 0
    this.staleKeyFrames = 0
  }

  get partnerPresent () { return this.connected && this._partnerPresent }
  get maxFrame () { return this.welcome !== null ? this.welcome.max_frame : DEFAULT_MAX_FRAME }
  get maxPayload () { return this.maxFrame - FRAME_OVERHEAD }
  get allAcked () { return this.sender.acked === this.sender.nextSeq - 1 }
  canSend (size) { return this.sender.canSend(size) }

  // ---------------------------------------------------------------------------- connection

  /** Start a new connection (fresh nonce and key); returns the HELLO message to send first. */
  connect (token) {
    const nonce = Uint8Array.from(this._random(NONCE_SIZE))
    const hello = makeHello({ token, session: this.sessionId, role: this.role, nonce, caps: this.caps, client: this.client })
    this.connectionLost()
    this.nonce = nonce
    this._cipher = new FrameCipher(deriveFrameKey(this._psk, this.sessionId, this.role, nonce))
    this._counter.reset()
    this.connected = true
    this._closed = false
    this.connections += 1
    return relayMessage(hello)
  }

  /** Our connection ended: transmit nothing until the partner's next resume. */
  connectionLost () {
    this.connected = false
    this.welcome = null
    this._partnerPresent = false
    this.sender.pause()
    this.#clearOutgoing()
  }

  #clearOutgoing () {
    this._outbox = []
    this._pendingAck = null
    this._pendingResume = null
  }

  // ------------------------------------------------------------------------------- sending

  /** Queue bytes on `channel`; throws BufferFull (wait for an 'acked' event) or RangeError. */
  sendData (channel, payload) {
    if (payload.length > this.maxPayload) throw new RangeError(`payload of ${payload.length} bytes exceeds maxPayload ${this.maxPayload}`)
    this.#queue(this.sender.send(Kind.DATA, Uint8Array.from(payload), { channel }))
  }

  /** Queue an application CONTROL map (a Map or plain object), sequenced with the data. */
  sendControl (data) {
    const payload = encodeAppControl(data)
    if (payload.length > this.maxPayload) throw new RangeError(`control map of ${payload.length} bytes exceeds maxPayload ${this.maxPayload}`)
    this.#queue(this.sender.send(Kind.CONTROL, payload))
  }

  #queue (frame) {
    if (frame !== null) this._outbox.push(this.#seal(frame))
  }

  #seal (frame) {
    try {
      return this._cipher.sealFrame(frame.kind, frame.payload, { seq: frame.seq, channel: frame.channel, flags: frame.flags, maxFrame: this.maxFrame })
    } catch (err) {
      throw new ProtocolError(`cannot retransmit frame ${frame.seq}: ${err.message}`)
    }
  }

  /** A HEARTBEAT message; its echo comes back as a 'heartbeat-echo' event. */
  heartbeat () {
    this._heartbeatSeq += 1
    return encodeFrame(Kind.HEARTBEAT, new Uint8Array(0), { seq: this._heartbeatSeq })
  }

  /** A CLOSE message ending the session for both peers. */
  closeMessage (code = 1000, reason = '') {
    return relayMessage(makeClose({ code, reason }))
  }

  /** Acknowledge everything delivered so far now (before a graceful close). */
  flushAck () {
    if (this.partnerPresent) {
      const seq = this.receiver.ackDue(Infinity)
      if (seq !== null) this._pendingAck = seq
    }
  }

  /** Queue what is due at `now` (an ack, a resume retry); call it at nextDeadline(). */
  poll (now) {
    if (!this.partnerPresent) return
    if (this._resumeSentAt === null) {
      this._resumeSentAt = now
    } else if (this.sender.paused && now >= this._resumeSentAt + RESUME_RETRY_S) {
      this._pendingResume = this.receiver.beginResume()
      this._resumeSentAt = now
    }
    const seq = this.receiver.ackDue(now)
    if (seq !== null) this._pendingAck = seq
  }

  /** When poll() next has something to do, or null. */
  nextDeadline () {
    if (!this.partnerPresent) return null
    const ack = this.receiver.nextAckDeadline()
    if (!this.sender.paused) return ack
    const retry = this._resumeSentAt === null ? 0 : this._resumeSentAt + RESUME_RETRY_S
    return ack === null ? retry : Math.min(ack, retry)
  }

  get hasDataToSend () {
    return this.connected && (this._outbox.length > 0 || this._pendingAck !== null || this._pendingResume !== null)
  }

  /** Messages to write now, in order (they leave the core). */
  dataToSend () {
    const out = []
    if (!this.connected) return out
    if (this._pendingResume !== null) {
      out.push(this.#sealTransport(encodeResume(this._pendingResume)))
      this._pendingResume = null
    }
    if (this._pendingAck !== null) {
      out.push(this.#sealTransport(encodeAck(this._pendingAck)))
      this._pendingAck = null
    }
    out.push(...this._outbox)
    this._outbox = []
    return out
  }

  #sealTransport (plaintext) {
    return this._cipher.sealFrame(Kind.CONTROL, plaintext, { seq: this._counter.take(), flags: Flags.UNSEQUENCED, maxFrame: this.maxFrame })
  }

  // ----------------------------------------------------------------------------- receiving

  /** Process one inbound message; returns its events. Throws ProtocolError (close with .code). */
  receive (message, now) {
    if (!this.connected) throw new ProtocolError('message received without an open connection')
    const { header, body } = decodeFrame(message, { maxFrame: this.maxFrame })
    const kind = header.kind
    if (this._closed) return []
    if (kind === Kind.CLOSE) {
      const close = decodeRelayMessage(kind, body)
      this._closed = true
      return [{ type: 'close', code: close.code, reason: close.reason, reconnectInMs: close.reconnect_in_ms }]
    }
    let events
    if (this.welcome === null) {
      if (kind !== Kind.WELCOME) throw new ProtocolError(`expected WELCOME, got ${KIND_NAMES[kind]}`)
      events = this.#onWelcome(decodeRelayMessage(kind, body))
    } else if (kind === Kind.HEARTBEAT) {
      return [{ type: 'heartbeat-echo', seq: header.seq }]
    } else if (kind === Kind.PEER) {
      events = this.#onPeer(decodeRelayMessage(kind, body))
    } else if (kind === Kind.DATA || kind === Kind.CONTROL) {
      events = this.#onSealed(header, message, now)
    } else {
      throw new ProtocolError(`unexpected ${KIND_NAMES[kind]} from the relay`)
    }
    this.poll(now)
    return events
  }

  #onWelcome (welcome) {
    if (!equalBytes(welcome.ack_nonce, this.nonce)) throw new ProtocolError('WELCOME does not echo our HELLO nonce')
    this.welcome = welcome
    if (welcome.peer !== null) this.#partnerArrived(welcome.peer)
    return [{ type: 'welcomed', welcome }]
  }

  #onPeer (event) {
    if (event.role !== this.partnerRole) throw new ProtocolError(`PEER event for role ${event.role}, our partner is ${this.partnerRole}`)
    if (event.event === 'left') {
      if (this._key !== null && !equalBytes(event.nonce, this._key.nonce)) return []
      this._partnerPresent = false
      this.sender.pause()
      this.#clearOutgoing()
      return [{ type: 'peer-left', peer: event.info }]
    }
    this.#partnerArrived(event.info)
    return [{ type: 'peer-joined', peer: event.info, rejoined: event.event === 'rejoined' }]
  }

  #partnerArrived (info) {
    if (info.role !== this.partnerRole) throw new ProtocolError(`partner has role ${info.role}, expected ${this.partnerRole}`)
    if (this._key === null || !equalBytes(this._key.nonce, info.nonce)) {
      const cipher = new FrameCipher(deriveFrameKey(this._psk, this.sessionId, info.role, info.nonce))
      this._previousKey = this._key
      this._key = new PartnerKey(cipher, info.nonce)
    }
    this.partner = info
    this._partnerPresent = true
    this.sender.pause()
    this.#clearOutgoing()
    this._pendingResume = this.receiver.beginResume()
    this._resumeSentAt = null
  }

  #onSealed (header, message, now) {
    const rawHeader = message.subarray(0, HEADER_SIZE)
    const body = message.subarray(HEADER_SIZE)
    let plaintext = null
    let used = null
    for (const key of [this._key, this._previousKey]) {
      if (key === null) continue
      try {
        plaintext = key.cipher.open(rawHeader, body)
      } catch (err) {
        if (err instanceof DecryptError) continue
        throw err
      }
      used = key
      break
    }
    if (plaintext === null) {
      this.integrityFailures += 1
      this._integrityRun += 1
      if (this._integrityRun >= INTEGRITY_FAILURE_LIMIT) {
        throw new ProtocolError(`${this._integrityRun} frames in a row failed authentication (wrong passphrase?)`, INTEGRITY_ERROR)
      }
      return []
    }
    this._integrityRun = 0
    const stale = used !== this._key
    if (stale) this.staleKeyFrames += 1
    if (header.unsequenced) {
      if (stale || !used.filter.accept(header.seq)) return []
      return this.#onTransport(decodeControl(plaintext, { flags: header.flags, maxSize: this.maxFrame }))
    }
    if (header.flags & Flags.COMPRESSED) throw new ProtocolError('compressed frame, but we announced no compression')
    if (!this.receiver.receive(header.seq, now)) return []
    if (header.kind === Kind.DATA) return [{ type: 'data', channel: header.channel, data: plaintext }]
    const control = decodeControl(plaintext, { flags: header.flags, maxSize: this.maxFrame })
    return [{ type: 'control', data: control.data }]
  }

  #onTransport (message) {
    if (typeof message.seq !== 'number') throw new ProtocolError(`${message.type} ${message.seq} is beyond any frame sent`)
    if (message.type === 'ack') {
      const freed = this.sender.ack(message.seq)
      return freed ? [{ type: 'acked', freed }] : []
    }
    if (!this._partnerPresent) return []
    const before = this.sender.bufferedBytes
    const frames = this.sender.resume(message.seq)
    const freed = before - this.sender.bufferedBytes
    this._outbox = frames.map((f) => this.#seal(f))
    const events = [{ type: 'resumed', seq: message.seq, retransmitted: frames.length }]
    if (freed) events.push({ type: 'acked', freed })
    return events
  }

  statistics () {
    return Object.freeze({
      connections: this.connections,
      connected: this.connected,
      welcomed: this.welcome !== null,
      partnerPresent: this.partnerPresent,
      integrityFailures: this.integrityFailures,
      staleKeyFrames: this.staleKeyFrames,
      nextSeq: this.sender.nextSeq,
      acked: this.sender.acked,
      bufferedBytes: this.sender.bufferedBytes,
      lastDelivered: this.receiver.lastDelivered
    })
  }
}
