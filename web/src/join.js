// The /join/ page (SPEC §12): a guest peer in the browser, showing the host's terminal in xterm.js.
// The session id and passphrase come from the form or from the fragment #{session}:{passphrase}
// (each part percent-encoded; a fragment never reaches a server, and it is removed from the
// address bar as soon as it is read). The token API is this page's own origin.

import { FitAddon } from '@xterm/addon-fit'
import { Terminal } from '@xterm/xterm'
import { BrowserPeer } from './peer.js'
import { CLOSE_NAMES, CloseCode } from './policy.js'

const $ = (id) => document.getElementById(id)
const UTF8 = new TextEncoder()
const params = new URLSearchParams(location.search)
// Test hook (tests/test_web_browser.py): the raw channel-0 stream and the states, read by the
// test instead of the screen; `heartbeat=S` sends heartbeats more often (always allowed).
const hook = params.has('test-hook') ? { chunks: [], states: [], controls: [], peer: null } : null
if (hook) window.__rescueJoin = hook

/** #{session}:{passphrase}, both percent-encoded; either part may be missing. */
export function parseFragment (fragment) {
  const text = fragment.replace(/^#/, '')
  if (!text) return { session: '', passphrase: '' }
  const at = text.indexOf(':')
  const decode = (s) => { try { return decodeURIComponent(s) } catch { return s } }
  return at < 0 ? { session: decode(text), passphrase: '' } : { session: decode(text.slice(0, at)), passphrase: decode(text.slice(at + 1)) }
}

function status (text, kind) {
  const el = $('status')
  el.textContent = text
  el.className = `status ${kind}`
  if (hook) hook.states.push(kind)
}

function describeClose (closed, exitStatus) {
  if (closed.code === CloseCode.INTEGRITY_ERROR) return ['Wrong passphrase: the host\'s frames failed authentication.', 'error']
  if (exitStatus !== null) return [`Session ended with status ${exitStatus}.`, 'ended']
  if (closed.code === CloseCode.NORMAL) return ['Session ended.', 'ended']
  if (closed.error?.name === 'TokenRefused') return [`Refused by the token service: ${closed.error.error}.`, 'error']
  const name = CLOSE_NAMES[closed.code] ?? 'closed'
  return [`Session closed: ${name}${closed.code ? ` (${closed.code})` : ''}${closed.reason ? `: ${closed.reason}` : ''}.`, 'error']
}

function join (sessionId, passphrase) {
  $('join-form').hidden = true
  const term = new Terminal({ convertEol: true, cursorBlink: true, scrollback: 5000, fontSize: 14 })
  const fit = new FitAddon()
  term.loadAddon(fit)
  term.open($('terminal'))
  fit.fit()
  const heartbeatS = hook && params.has('heartbeat') ? Number(params.get('heartbeat')) : null
  // ?cohort=C: the host's cohort when it is not the default (rescue share puts it in the URL).
  const cohort = params.get('cohort') || undefined
  const peer = new BrowserPeer({ api: location.origin, sessionId, passphrase, role: 'guest', client: 'rescue-web/0.1 (join)', heartbeatS, cohort })
  if (hook) { hook.peer = peer; hook.term = term }
  let exitStatus = null
  // A host on a pty sends {"winsize"}; until then its output is a plain byte stream, whose bare
  // \n must become \r\n on screen (and typed Enter a \n), as a cooked terminal would do.
  let ptyHost = false
  peer.addEventListener('state', ({ detail }) => {
    switch (detail.state) {
      case 'deriving': return status('Deriving the key from the passphrase…', 'deriving')
      case 'connecting': return status('Connecting…', 'connecting')
      case 'waiting': return status('Waiting for the host…', 'waiting')
      case 'connected': sendSize(); return status('Connected.', 'connected')
      case 'reconnecting': return status(`Connection lost; reconnecting in ${detail.delayS.toFixed(1)} s…`, 'reconnecting')
      case 'closed': {
        const [text, kind] = describeClose(detail, exitStatus)
        term.options.disableStdin = true
        return status(text, kind)
      }
    }
  })
  peer.addEventListener('data', ({ detail }) => {
    if (detail.channel === 0 || detail.channel === 2) term.write(detail.data)
    if (hook && detail.channel === 0) hook.chunks.push(detail.data)
  })
  peer.addEventListener('control', ({ detail }) => {
    const data = detail.data
    if (hook) hook.controls.push(Object.fromEntries([...data].filter(([k]) => typeof k === 'string')))
    if (data.has('exit')) exitStatus = Number(data.get('exit'))
    if (data.has('winsize') && !ptyHost) { ptyHost = true; term.options.convertEol = false }
  })
  term.onData((text) => {
    if (peer.closed !== null) return
    peer.send(1, UTF8.encode(ptyHost ? text : text.replace(/\r/g, '\n'))).catch(() => {})
  })
  let lastSize = ''
  function sendSize () {
    const size = `${term.rows}×${term.cols}`
    $('size').textContent = `Window ${size} · the host's terminal sets the size (the smallest attached window wins)`
    if (peer.partnerPresent && size !== lastSize) {
      lastSize = size
      peer.sendControl({ winsize: [term.rows, term.cols] }).catch(() => {})
    }
  }
  term.onResize(sendSize)
  window.addEventListener('resize', () => fit.fit())
  sendSize()
  term.focus()
  peer.start().catch((err) => status(`Cannot start: ${err.message}`, 'error'))
}

function main () {
  const { session, passphrase } = parseFragment(location.hash)
  if (location.hash) history.replaceState(null, '', location.pathname + location.search) // never left in the bar
  $('session').value = session
  if (session && passphrase) {
    join(session, passphrase)
    return
  }
  ;(session ? $('passphrase') : $('session')).focus()
  $('join-form').addEventListener('submit', (event) => {
    event.preventDefault()
    const pass = $('passphrase').value
    $('passphrase').value = ''
    join($('session').value.trim(), pass)
  })
}

main()
