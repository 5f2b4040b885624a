// The ordered stream of SPEC §2 "Ordering, acks and lossless resume" as pure state machines: a
// port of rescue/protocol/_stream.py (docs/protocol.md "Ordering, acks and resume" has the rules).
// No I/O, no clock (time comes in as `now`, seconds), no crypto.

import { BufferFull, ProtocolError } from './errors.js'
import { Flags, Kind } from './frames.js'

export const DEFAULT_REPLAY_BUFFER_BYTES = 4 * 1024 * 1024
// Charged per buffered frame on top of its payload (header + tag + bookkeeping), so a flood of
// empty frames is bounded too.
export const FRAME_OVERHEAD_BYTES = 64
export const ACK_EVERY_FRAMES = 64
export const ACK_INTERVAL_S = 1.0
// Sequence numbers are JS Numbers: exact up to 2**53 - 1, which no session reaches (a frame per
// microsecond for 285 years). Past it the session ends, as Python's does at 2**64 - 1.
export const MAX_SAFE_SEQ = Number.MAX_SAFE_INTEGER

function checkSeq (seq, what) {
  if (typeof seq !== 'number' || !Number.isInteger(seq) || seq < 0 || seq > MAX_SAFE_SEQ) {
    throw new ProtocolError(`${what} ${seq} is outside 0..2**53-1`)
  }
}

/** Sequence numbers, replay buffer and resume for our direction of a session. Starts paused. */
export class Sender {
  constructor ({ maxBufferBytes = DEFAULT_REPLAY_BUFFER_BYTES } = {}) {
    if (maxBufferBytes < FRAME_OVERHEAD_BYTES) throw new RangeError(`maxBufferBytes must be at least ${FRAME_OVERHEAD_BYTES}`)
    this.maxBufferBytes = maxBufferBytes
    this.nextSeq = 1
    this.acked = 0
    this.highestTransmitted = 0
    this.paused = true
    this.buffer = [] // Outbound frames in seq order; `head` indexes the first live one
    this.head = 0
    this.bufferedBytes = 0
    this.retransmittedFrames = 0
    this.resumes = 0
  }

  get freeBytes () { return this.maxBufferBytes - this.bufferedBytes }
  get bufferedFrames () { return this.buffer.length - this.head }
  canSend (size) { return size + FRAME_OVERHEAD_BYTES <= this.freeBytes }

  /** Number a frame and buffer it; returns it to transmit now, or null while paused. */
  send (kind, payload, { channel = 0, flags = Flags.NONE } = {}) {
    if (kind !== Kind.DATA && kind !== Kind.CONTROL) throw new RangeError(`kind ${kind} is not a sequenced kind`)
    if (flags & ~Flags.COMPRESSED) throw new RangeError('only the COMPRESSED flag may be set on a sequenced frame')
    if (!(channel >= 0 && channel <= 0xff) || (kind === Kind.CONTROL && channel)) throw new RangeError(`channel ${channel} is not allowed`)
    const cost = payload.length + FRAME_OVERHEAD_BYTES
    if (cost > this.maxBufferBytes) throw new RangeError(`a ${payload.length}-byte payload can never fit a ${this.maxBufferBytes}-byte buffer`)
    if (cost > this.freeBytes) throw new BufferFull(cost, this.freeBytes)
    if (this.nextSeq > MAX_SAFE_SEQ) throw new ProtocolError('sequence space exhausted')
    const frame = Object.freeze({ seq: this.nextSeq, kind, channel, flags, payload, cost })
    this.nextSeq += 1
    this.buffer.push(frame)
    this.bufferedBytes += cost
    if (this.paused) return null
    this.highestTransmitted = frame.seq
    return frame
  }

  /** Apply {"ack": seq}: free every buffered frame up to seq; returns the bytes freed. */
  ack (seq) {
    checkSeq(seq, 'ack')
    if (seq > this.highestTransmitted) throw new ProtocolError(`ack ${seq} is beyond the highest frame sent (${this.highestTransmitted})`)
    if (seq <= this.acked) return 0
    let freed = 0
    while (this.head < this.buffer.length && this.buffer[this.head].seq <= seq) {
      freed += this.buffer[this.head].cost
      this.head += 1
    }
    if (this.head > 1024 && this.head * 2 > this.buffer.length) {
      this.buffer = this.buffer.slice(this.head)
      this.head = 0
    }
    this.bufferedBytes -= freed
    this.acked = seq
    return freed
  }

  pause () { this.paused = true }

  /** Apply {"resume": seq}: ack seq, return every frame after it (to retransmit), go live. */
  resume (seq) {
    checkSeq(seq, 'resume')
    if (seq < this.acked) {
      throw new ProtocolError(`resume from ${seq} but ${this.acked} was already acknowledged: frames ${seq + 1}..${this.acked} were discarded`)
    }
    if (seq > this.highestTransmitted) throw new ProtocolError(`resume ${seq} is beyond the highest frame sent (${this.highestTransmitted})`)
    this.ack(seq)
    this.paused = false
    this.resumes += 1
    const frames = this.buffer.slice(this.head)
    if (frames.length) {
      this.retransmittedFrames += frames.filter((f) => f.seq <= this.highestTransmitted).length
      this.highestTransmitted = frames[frames.length - 1].seq
    }
    return frames
  }
}

/** In-order delivery, duplicate and gap detection, and the ack schedule for the partner's stream. */
export class Receiver {
  constructor ({ ackEvery = ACK_EVERY_FRAMES, ackInterval = ACK_INTERVAL_S } = {}) {
    if (ackEvery < 1 || !(ackInterval > 0)) throw new RangeError('ackEvery must be >= 1 and ackInterval > 0')
    this.ackEvery = ackEvery
    this.ackInterval = ackInterval
    this.lastDelivered = 0
    this.lastAcked = 0
    this.unacked = 0
    this.firstUnackedAt = null
    this.dupPending = false
    this.resyncing = false
    this.delivered = 0
    this.duplicates = 0
    this.staleDropped = 0
    this.acksSent = 0
  }

  /** true: deliver now; false: drop silently (retransmit, or stale tail while resyncing). */
  receive (seq, now) {
    if (typeof seq !== 'number' || !(seq >= 1 && seq <= MAX_SAFE_SEQ)) {
      throw new ProtocolError(`sequenced frame with seq ${seq}; this client handles 1..2**53-1`)
    }
    if (seq <= this.lastDelivered) {
      this.duplicates += 1
      if (this.lastDelivered > this.lastAcked) this.dupPending = true
      return false
    }
    if (seq > this.lastDelivered + 1) {
      if (this.resyncing) { this.staleDropped += 1; return false }
      throw new ProtocolError(`gap in the stream: got seq ${seq} after ${this.lastDelivered}`)
    }
    this.resyncing = false
    this.lastDelivered = seq
    this.delivered += 1
    this.unacked += 1
    if (this.firstUnackedAt === null) this.firstUnackedAt = now
    return true
  }

  /** The seq to acknowledge now, or null; a returned value counts as sent. */
  ackDue (now) {
    if (this.lastDelivered <= this.lastAcked) return null
    const started = this.firstUnackedAt
    if (!(this.dupPending || this.unacked >= this.ackEvery || (started !== null && now - started >= this.ackInterval))) return null
    this.#markAcked()
    this.acksSent += 1
    return this.lastDelivered
  }

  nextAckDeadline () {
    if (this.lastDelivered <= this.lastAcked || this.firstUnackedAt === null) return null
    if (this.dupPending || this.unacked >= this.ackEvery) return this.firstUnackedAt
    return this.firstUnackedAt + this.ackInterval
  }

  /** The n of the {"resume": n} to send now; starts resyncing. */
  beginResume () {
    this.#markAcked()
    this.resyncing = true
    return this.lastDelivered
  }

  #markAcked () {
    this.lastAcked = this.lastDelivered
    this.unacked = 0
    this.firstUnackedAt = null
    this.dupPending = false
  }
}

/** Numbers our UNSEQUENCED CONTROL messages on one connection: 1, 2, 3, ... */
export class UnsequencedCounter {
  constructor () { this.next = 1 }
  reset () { this.next = 1 }
  take () {
    if (this.next > MAX_SAFE_SEQ) throw new ProtocolError('UNSEQUENCED counter exhausted on this key')
    return this.next++
  }
}

/** Drops UNSEQUENCED messages whose counter is not above the last one accepted under a key. */
export class UnsequencedFilter {
  constructor () { this.last = 0 }
  accept (counter) {
    if (typeof counter !== 'number' || counter <= this.last) return false
    this.last = counter
    return true
  }
}
