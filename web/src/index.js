// The browser peer's public face: the sans-I/O core, the WebSocket shell, and the pieces an
// integrator may want on their own (see docs/browser.md).
export { BrowserPeer, TokenRefused, defaultTicker } from './peer.js'
export { PeerCore, CLIENT_NAME } from './core.js'
export { ready, derivePsk, deriveFrameKey, pskSalt, FrameCipher } from './crypto.js'
export { CloseCode, CLOSE_NAMES, BackoffPolicy, policyFor } from './policy.js'
export { ProtocolError, BufferFull } from './errors.js'
export { Kind, Flags } from './frames.js'
