// Shared plumbing for the interop-*.mjs scripts that the Rust test harness
// runs as child processes against a relay (Converge or reference-server.mjs).
//
// Conventions every script follows (implemented here):
//   * exactly one JSON line on stdout, printed at the very end
//       success  -> {"ok":true,...}                      exit 0
//       failure  -> {"ok":false,"error":"..."}           exit 1 (message also on stderr)
//       timeout  -> {"ok":false,"timeout":true,"waitingFor":"..."}  exit 2
//   * a hard timeout (20 s, or env INTEROP_TIMEOUT_MS) that reports what the
//     script was waiting for;
//   * every Repo is shut down and process.exit is called explicitly, so no
//     socket, reconnect interval or timer can keep Node alive.
//
// Progress notes go to stderr as lines starting with "interop:" so the
// harness can show them when a test fails (INTEROP_QUIET=1 silences them);
// stdout stays machine-readable.

import fs from "node:fs"
import { Repo, parseAutomergeUrl, decodeHeads } from "@automerge/automerge-repo"
import { Automerge, cbor } from "@automerge/automerge-repo/slim"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

export { Automerge }

const DEFAULT_TIMEOUT_MS = 20_000

function envInt(name, fallback) {
  const raw = process.env[name]
  if (raw === undefined || raw === "") return fallback
  const n = Number(raw)
  if (!Number.isFinite(n) || n < 0) {
    process.stderr.write(`interop: ignoring bad ${name}=${raw}\n`)
    return fallback
  }
  return n
}

export const TIMEOUT_MS = envInt("INTEROP_TIMEOUT_MS", DEFAULT_TIMEOUT_MS)
export { envInt }

const startedAt = Date.now()
export const elapsed = () => Date.now() - startedAt

let scriptName = "interop"
let waitingFor = "start-up"
let finished = false
const openRepos = new Set()
const openTimers = new Set()
const clients = []

// For timeout reports: is each client still connected to the relay?
function clientStatus() {
  return clients.map(c => ({
    label: c.label,
    peerId: c.repo.peerId,
    relayConnected: c.repo.peers.length > 0,
    disconnects: c.disconnects,
    received: c.adapter.received.length,
  }))
}

/** Record what we are currently waiting for (reported on timeout). */
export function waiting(what) {
  waitingFor = what
  log(`waiting for ${what}`)
}

const quiet = process.env.INTEROP_QUIET === "1"
export function log(msg) {
  if (quiet) return
  process.stderr.write(`interop: ${scriptName} +${elapsed()}ms ${msg}\n`)
}

/**
 * Install the hard timeout and last-resort error handlers. Call first.
 * `hardTimeout: false` is for long-running processes (the reference server).
 */
export function setup(name, { hardTimeout = true } = {}) {
  scriptName = name
  if (hardTimeout) {
    const t = setTimeout(() => {
      const msg = `${name}: TIMEOUT after ${TIMEOUT_MS} ms while waiting for: ${waitingFor}`
      process.stderr.write(msg + "\n")
      emitAndExit(
        { ok: false, timeout: true, waitingFor, timeoutMs: TIMEOUT_MS, clients: clientStatus() },
        2
      )
    }, TIMEOUT_MS)
    t.unref()
  }
  // The websocket client adapter rethrows socket errors other than
  // ECONNREFUSED from an event handler; turn those (and any stray rejection)
  // into a clean failure rather than a Node stack dump.
  process.on("uncaughtException", err => fail(`uncaught exception: ${errText(err)}`))
  process.on("unhandledRejection", err => fail(`unhandled rejection: ${errText(err)}`))
}

export function errText(err) {
  if (err instanceof Error) return err.message || String(err)
  return String(err)
}

function shutdownAll() {
  for (const t of openTimers) {
    clearTimeout(t)
    clearInterval(t)
  }
  openTimers.clear()
  for (const repo of openRepos) {
    try {
      // shutdown() disconnects the adapters synchronously, then flushes
      // storage (none here), so the returned promise is not needed.
      const p = repo.shutdown()
      if (p && typeof p.catch === "function") p.catch(() => {})
    } catch {
      // an adapter that never connected asserts in disconnect(); ignore
    }
  }
  openRepos.clear()
}

function emitAndExit(obj, code) {
  if (finished) return
  finished = true
  // Sockets to wait for, so the relay sees a proper close handshake rather
  // than a reset (at most CLOSE_WAIT_MS).
  const sockets = []
  for (const repo of openRepos) {
    for (const a of repo.networkSubsystem.adapters) {
      if (a.socket && a.socket.readyState <= 1) sockets.push(a.socket)
    }
  }
  shutdownAll()
  const line = JSON.stringify(obj) + "\n"
  try {
    // Synchronous write: the line is complete before process.exit runs.
    fs.writeSync(1, line)
  } catch {
    process.stdout.write(line)
  }
  const closed = sockets.map(
    ws => new Promise(resolve => (ws.readyState === 3 ? resolve() : ws.once("close", resolve)))
  )
  const cap = new Promise(resolve => setTimeout(resolve, CLOSE_WAIT_MS))
  Promise.race([Promise.all(closed), cap]).then(() => process.exit(code))
}

const CLOSE_WAIT_MS = 300

/** Print the success line and exit 0. */
export function succeed(result) {
  emitAndExit({ ok: true, ...result }, 0)
}

/** Print a failure (stderr + JSON line) and exit 1. */
export function fail(message, extra = {}) {
  if (!finished) process.stderr.write(`${scriptName}: FAILED: ${message}\n`)
  emitAndExit({ ok: false, error: message, ...extra }, 1)
}

/** setTimeout / setInterval that are cleared on exit. */
export function timer(fn, ms, { repeat = false } = {}) {
  const t = repeat ? setInterval(fn, ms) : setTimeout(fn, ms)
  openTimers.add(t)
  return t
}

export function clearTimer(t) {
  clearTimeout(t)
  clearInterval(t)
  openTimers.delete(t)
}

export const sleep = ms =>
  new Promise(resolve => {
    const t = timer(() => {
      openTimers.delete(t)
      resolve()
    }, ms)
  })

/**
 * Resolve once `check()` returns a truthy value (which is returned). Checks
 * immediately, on every emitter event listed in `events`, and every
 * `intervalMs` as a fallback. Runs until the hard timeout unless `limitMs`.
 */
export function until(label, check, { events = [], intervalMs = 50, limitMs } = {}) {
  waiting(label)
  return new Promise((resolve, reject) => {
    let done = false
    const cleanups = []
    const finish = (fn, v) => {
      if (done) return
      done = true
      cleanups.forEach(c => c())
      fn(v)
    }
    const probe = () => {
      if (done) return
      let v
      try {
        v = check()
      } catch (e) {
        finish(reject, e)
        return
      }
      if (v) finish(resolve, v)
    }
    for (const [emitter, name] of events) {
      emitter.on(name, probe)
      cleanups.push(() => emitter.off(name, probe))
    }
    const iv = timer(probe, intervalMs, { repeat: true })
    cleanups.push(() => clearTimer(iv))
    if (limitMs !== undefined) {
      const lt = timer(() => finish(resolve, undefined), limitMs)
      cleanups.push(() => clearTimer(lt))
    }
    probe()
  })
}

/**
 * A WebSocketClientAdapter that also remembers every protocol message it
 * sends and receives, so scripts can report wire-level fields that the
 * DocHandle events do not expose (ephemeral count/sessionId, doc-unavailable).
 * Only the public send()/"message" surface is touched.
 */
export class RecordingClientAdapter extends WebSocketClientAdapter {
  constructor(url, retryInterval) {
    super(url, retryInterval)
    this.sent = []
    this.received = []
    // Every byte the relay sent (as latin1 text, to search for content that
    // must not leak) and the `error` messages, which the adapter only logs.
    this.raw = ""
    this.errors = []
    this.on("message", msg => this.received.push(summarize(msg)))
  }
  receiveMessage(messageBytes) {
    const bytes = new Uint8Array(messageBytes)
    this.raw += Buffer.from(bytes).toString("latin1")
    try {
      const msg = cbor.decode(bytes)
      if (msg && msg.type === "error") this.errors.push(String(msg.message))
    } catch {
      // the adapter reports undecodable frames itself
    }
    return super.receiveMessage(messageBytes)
  }
  send(message) {
    this.sent.push(summarize(message))
    return super.send(message)
  }
}

function summarize(msg) {
  const out = {}
  for (const [k, v] of Object.entries(msg)) {
    if (k === "data" && v instanceof Uint8Array) out.dataLength = v.byteLength
    else out[k] = v
  }
  if (msg.type === "ephemeral" && msg.data instanceof Uint8Array) out.data = msg.data
  out.at = elapsed()
  return out
}

/**
 * A fresh in-memory Repo connected to the relay, resolved once the relay has
 * answered the handshake (so repo.find never races the connection: without
 * this, automerge-repo gives up waiting for the network after 1 s and a
 * find() issued with no peer is reported unavailable at once).
 */
export async function connectClient(wsUrl, label = "client") {
  const adapter = new RecordingClientAdapter(wsUrl, envInt("INTEROP_RETRY_MS", 1000))
  const repo = new Repo({ network: [adapter] })
  openRepos.add(repo)
  await until(`${label}: websocket handshake with ${wsUrl}`, () => repo.peers.length > 0, {
    events: [[repo.networkSubsystem, "peer"]],
  })
  const relayPeerId = repo.peers[0]
  log(`${label} ${repo.peerId} connected to relay peer ${relayPeerId}`)
  const client = { repo, adapter, relayPeerId, label, disconnects: 0 }
  repo.networkSubsystem.on("peer-disconnected", () => {
    client.disconnects++
    log(`${label}: relay connection lost (automerge-repo will reconnect)`)
  })
  clients.push(client)
  return client
}

/** The document as plain JSON data. */
export function docJson(handle) {
  return JSON.parse(JSON.stringify(handle.doc()))
}

/** Order-insensitive structural equality for JSON values. */
export function deepEqual(a, b) {
  if (a === b) return true
  if (typeof a !== typeof b || a === null || b === null) return false
  if (Array.isArray(a) !== Array.isArray(b)) return false
  if (Array.isArray(a)) {
    return a.length === b.length && a.every((x, i) => deepEqual(x, b[i]))
  }
  if (typeof a === "object") {
    const ka = Object.keys(a)
    const kb = Object.keys(b)
    if (ka.length !== kb.length) return false
    return ka.every(k => Object.prototype.hasOwnProperty.call(b, k) && deepEqual(a[k], b[k]))
  }
  return false
}

export function documentIdOf(url) {
  return parseAutomergeUrl(url).documentId
}

/** Does `handle`'s document contain every change in `heads` (UrlHeads)? */
export function handleHasHeads(handle, heads) {
  if (!handle.isReady()) return false
  const doc = handle.doc()
  return Automerge.hasHeads(doc, heads.map(urlHeadToHex))
}

// UrlHeads are base58check strings; Automerge wants hex.
const urlHeadToHex = h => decodeHeads([h])[0]

/**
 * Wait until the relay holds every change of `handle` as it is now.
 *
 * Fast path: if the relay announced a storageId in its peer metadata,
 * automerge-repo records the heads the relay reports in its sync messages
 * (handle.getSyncInfo(storageId)); wait until those cover our heads.
 * Fallback (relay without storageId): a second, fresh client must be able to
 * find the document and see all our changes.
 */
export async function waitUntilRelayHas(client, handle, wsUrl) {
  const heads = handle.heads()
  const storageId = client.repo.getStorageIdOfPeer(client.relayPeerId)
  const t0 = elapsed()
  if (storageId) {
    // Compare against our *current* heads: they always contain the changes
    // we are asking about, and if someone else writes concurrently the relay
    // forwards that to us too, so the two sides converge on the same heads.
    await until(`relay (storageId ${storageId}) to acknowledge heads ${heads.join(",")}`, () => {
      const info = handle.getSyncInfo(storageId)
      return !!info && sameSet(info.lastHeads, handle.heads())
    }, { events: [[handle, "remote-heads"]] })
    return { via: "remote-heads", storageId, ms: elapsed() - t0 }
  }
  const checker = await connectClient(wsUrl, "verifier")
  waiting("verifier client: repo.find through the relay")
  const vh = await checker.repo.find(handle.url)
  await until("verifier client to see all our changes", () => handleHasHeads(vh, heads), {
    events: [[vh, "change"]],
  })
  return { via: "fresh-client", ms: elapsed() - t0 }
}

function sameSet(a, b) {
  return a.length === b.length && a.every(x => b.includes(x))
}

/** Bad command line: report and exit 1 at once (nothing is open yet). */
export function usage(text) {
  finished = true
  process.stderr.write(`usage: ${text}\n`)
  fs.writeSync(1, JSON.stringify({ ok: false, error: `usage: ${text}` }) + "\n")
  process.exit(1)
}
