// Errors of the browser peer, mirroring rescue/errors.py: a ProtocolError carries the close code
// the session must end with (PROTOCOL_ERROR unless said otherwise).

export const PROTOCOL_ERROR_CODE = 4010

/** The relay or the partner broke the protocol; close with `code`. */
export class ProtocolError extends Error {
  constructor (message, code = PROTOCOL_ERROR_CODE) {
    super(message)
    this.name = 'ProtocolError'
    this.code = code
  }
}

/** The replay buffer has no room for a frame of `cost` bytes; wait for an ack (backpressure). */
export class BufferFull extends Error {
  constructor (cost, free) {
    super(`replay buffer full: a ${cost}-byte frame does not fit in ${free} free bytes`)
    this.name = 'BufferFull'
    this.cost = cost
    this.free = free
  }
}
