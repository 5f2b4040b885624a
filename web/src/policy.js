// Close codes (SPEC §2) and what a client does on each, with exponential backoff and full jitter
// (base 250 ms, cap 30 s): the rules of rescue/_codes.py and rescue/client/_backoff.py.

export const CloseCode = Object.freeze({
  NORMAL: 1000,
  SERVER_SHUTDOWN: 1012,
  AUTH_FAILED: 4001,
  TOKEN_EXPIRED: 4002,
  GUARDRAIL_TRIPPED: 4003,
  SESSION_MISMATCH: 4004,
  WRONG_NODE: 4005,
  HEARTBEAT_TIMEOUT: 4008,
  RATE_LIMITED: 4009,
  PROTOCOL_ERROR: 4010,
  REPLACED: 4011,
  PAIR_TIMEOUT: 4012,
  PEER_GONE: 4013,
  INTEGRITY_ERROR: 4014,
  OVERLOADED: 4029
})
export const CLOSE_NAMES = Object.freeze(Object.fromEntries(Object.entries(CloseCode).map(([k, v]) => [v, k])))

const STOP = Object.freeze({ reconnect: false, newToken: false, backoff: 'none' })
const policy = (newToken, backoff) => Object.freeze({ reconnect: true, newToken, backoff })
const POLICIES = {
  [CloseCode.NORMAL]: STOP,
  [CloseCode.SERVER_SHUTDOWN]: policy(true, 'server'),
  [CloseCode.AUTH_FAILED]: STOP,
  [CloseCode.TOKEN_EXPIRED]: policy(true, 'none'),
  [CloseCode.GUARDRAIL_TRIPPED]: STOP,
  [CloseCode.SESSION_MISMATCH]: STOP,
  [CloseCode.WRONG_NODE]: policy(true, 'none'),
  [CloseCode.HEARTBEAT_TIMEOUT]: policy(false, 'normal'),
  [CloseCode.RATE_LIMITED]: policy(false, 'long'),
  [CloseCode.PROTOCOL_ERROR]: STOP,
  [CloseCode.REPLACED]: STOP,
  [CloseCode.PAIR_TIMEOUT]: STOP,
  [CloseCode.PEER_GONE]: STOP,
  [CloseCode.INTEGRITY_ERROR]: STOP,
  [CloseCode.OVERLOADED]: policy(true, 'normal')
}
// No close code (1006, a TCP reset) or an unknown one: retry with backoff.
const ABNORMAL = policy(false, 'normal')

/** {reconnect, newToken, backoff: 'none'|'normal'|'long'|'server'} for a close code (or null). */
export function policyFor (code) {
  if (code === null || code === undefined) return ABNORMAL
  return POLICIES[code] ?? ABNORMAL
}

export const BASE_DELAY_S = 0.25
export const MAX_DELAY_S = 30.0
export const LONG_BACKOFF_STEPS = 4
export const MAX_IMMEDIATE_RETRIES = 1

/** Reconnect delays in seconds; `random` is the jitter source (Math.random, or a seeded one). */
export class BackoffPolicy {
  constructor ({ base = BASE_DELAY_S, cap = MAX_DELAY_S, longSteps = LONG_BACKOFF_STEPS, random = Math.random } = {}) {
    this.base = base
    this.cap = cap
    this.longSteps = longSteps
    this.random = random
  }

  window (attempt) { return Math.min(this.cap, this.base * 2 ** Math.min(attempt, 62)) }
  fullJitter (attempt) { return this.random() * this.window(attempt) }

  /** The delay for a policy's backoff kind after `attempt` consecutive failures (0-based). */
  delay (kind, attempt, { reconnectInMs = null } = {}) {
    if (kind === 'server') return reconnectInMs !== null ? reconnectInMs / 1000 : this.fullJitter(attempt)
    if (kind === 'none') return attempt < MAX_IMMEDIATE_RETRIES ? 0 : this.fullJitter(attempt)
    if (kind === 'long') return this.fullJitter(attempt + this.longSteps)
    return this.fullJitter(attempt)
  }
}
