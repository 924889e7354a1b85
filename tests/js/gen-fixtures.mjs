// Generates golden CBOR fixtures of automerge-repo v1 wire messages.
//
//   node tests/js/gen-fixtures.mjs        (from the repository root)
//
// Three sources of frames:
//   captured-client  a real automerge-repo Repo + WebSocketClientAdapter talks
//                    to a recording `ws` server written here; every binary
//                    frame the real client sends is kept verbatim.
//   captured-server  a real automerge-repo Repo + WebSocketServerAdapter
//                    (NodeWSServerAdapter) answers raw `ws` clients written
//                    here; every binary frame the real server sends is kept.
//   synthetic        messages built here and encoded with automerge-repo's own
//                    CBOR encoder, for shapes that are hard to provoke.
//
// Output: tests/fixtures/wire/<name>.cbor and tests/fixtures/wire/manifest.json.
// Existing *.cbor files and manifest.json in that folder are replaced on every
// run; README.md is left alone.

import fs from "node:fs"
import os from "node:os"
import path from "node:path"
import { fileURLToPath } from "node:url"

import { WebSocketServer, WebSocket } from "ws"
import {
  Repo,
  Presence,
  cbor,
  generateAutomergeUrl,
  parseAutomergeUrl,
  encodeHeads,
} from "@automerge/automerge-repo"
// The slim entrypoint re-exports the Automerge namespace; the import of the
// full entrypoint above has already initialised the wasm it uses.
import { Automerge as A } from "@automerge/automerge-repo/slim"
import {
  WebSocketClientAdapter,
  WebSocketServerAdapter,
} from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const HARD_TIMEOUT_MS = 20_000
const hardTimer = setTimeout(() => {
  console.error(
    `gen-fixtures: FAILED — still running after ${HARD_TIMEOUT_MS} ms ` +
      "(a step hung or a server/socket/timer was left open)"
  )
  process.exit(2)
}, HARD_TIMEOUT_MS)
hardTimer.unref()

const HERE = path.dirname(fileURLToPath(import.meta.url))
// CONVERGE_FIXTURE_OUT redirects the output (make test regenerates into a
// scratch folder and checks the Rust codec against the fresh frames).
const OUT_DIR = process.env.CONVERGE_FIXTURE_OUT
  ? path.resolve(process.env.CONVERGE_FIXTURE_OUT)
  : path.resolve(HERE, "..", "fixtures", "wire")

// Fixed ids so that re-runs differ only where the protocol is inherently
// random (document ids, change hashes, sync payloads, timestamps, sessionIds).
const IDS = {
  recorderPeer: "recorder-server",
  recorderStorage: "0f4e6a8c-2b1d-4c3e-9a7f-5d6b8c9e0a1b",
  clientNoStoragePeer: "js-client-nostorage",
  clientStoragePeer: "js-client-storage",
  clientStorage: "3c2b1a09-8f7e-4d6c-b5a4-938271605f4e",
  relayPeer: "js-relay-server",
  relayStorage: "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
  gossipPeer: "js-gossip-server",
  rawStorageA: "11111111-2222-4333-8444-555555555555",
  rawStorageB: "66666666-7777-4888-9999-aaaaaaaaaaaa",
}

// ---------------------------------------------------------------- utilities

const hex = bytes => Buffer.from(bytes).toString("hex")
const sleep = ms => new Promise(r => setTimeout(r, ms))

function withTimeout(promise, ms, what) {
  let t
  const timeout = new Promise((_, reject) => {
    t = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(t))
}

function toU8(data) {
  if (data instanceof Uint8Array) return new Uint8Array(data)
  if (data instanceof ArrayBuffer) return new Uint8Array(data)
  if (Array.isArray(data)) return new Uint8Array(Buffer.concat(data))
  throw new Error(`unexpected frame payload type ${typeof data}`)
}

// JSON rendering of a decoded message, keeping key order as decoded.
function render(v) {
  if (v === undefined) return { $undefined: true }
  if (v === null || typeof v === "boolean" || typeof v === "string") return v
  if (typeof v === "number") {
    if (!Number.isFinite(v)) throw new Error(`non-finite number ${v}`)
    return v
  }
  if (typeof v === "bigint") return { $bigint: v.toString() }
  if (v instanceof Uint8Array) return { $bytes: hex(v) }
  if (Array.isArray(v)) return v.map(render)
  if (v instanceof Map) {
    return { $map: [...v.entries()].map(([k, x]) => [render(k), render(x)]) }
  }
  if (typeof v === "object") {
    const out = {}
    for (const k of Object.keys(v)) out[k] = render(v[k])
    return out
  }
  throw new Error(`cannot render ${typeof v}`)
}

// A small CBOR walker over the raw bytes. It reports what the JS decoder
// hides: the order keys really appear in, which major type / width each
// number used, non-minimal length heads, indefinite lengths, undefined.
function inspectCbor(buf) {
  let pos = 0
  const numbers = []
  const nonMinimal = []
  const indefinite = []
  const tags = []
  let undefinedCount = 0
  let nullCount = 0

  const MAJOR = ["uint", "nint", "bytes", "text", "array", "map", "tag", "simple"]

  function readHead() {
    const start = pos
    const ib = buf[pos++]
    const major = ib >> 5
    const ai = ib & 0x1f
    let arg = null
    if (ai < 24) arg = BigInt(ai)
    else if (ai >= 24 && ai <= 27) {
      const n = 1 << (ai - 24)
      let x = 0n
      for (let i = 0; i < n; i++) x = (x << 8n) | BigInt(buf[pos++])
      arg = x
    } else if (ai === 31) arg = null
    else throw new Error(`reserved additional info ${ai} at ${start}`)
    if (pos > buf.length) throw new Error("truncated CBOR")
    return { start, ib, major, ai, arg }
  }

  function checkMinimal(h, p) {
    if (h.ai < 24 || h.ai > 27 || h.major === 7) return
    const limits = { 24: 24n, 25: 0x100n, 26: 0x10000n, 27: 0x100000000n }
    if (h.arg < limits[h.ai]) {
      nonMinimal.push({
        path: p || "$",
        major: MAJOR[h.major],
        head: "0x" + buf.slice(h.start, pos).toString("hex"),
        value: Number(h.arg),
      })
    }
  }

  function item(p) {
    const h = readHead()
    checkMinimal(h, p)
    switch (h.major) {
      case 0:
      case 1: {
        const value = h.major === 0 ? h.arg : -1n - h.arg
        numbers.push({
          path: p,
          encoding: `${MAJOR[h.major]}${h.ai < 24 ? "" : 8 << (h.ai - 24)}`,
          head: "0x" + h.ib.toString(16).padStart(2, "0"),
          value: Number(value),
        })
        return MAJOR[h.major]
      }
      case 2:
      case 3: {
        if (h.arg === null) {
          indefinite.push({ path: p, major: MAJOR[h.major] })
          while (buf[pos] !== 0xff) item(p + "(chunk)")
          pos++
        } else pos += Number(h.arg)
        return MAJOR[h.major]
      }
      case 4: {
        if (h.arg === null) {
          indefinite.push({ path: p, major: "array" })
          for (let i = 0; buf[pos] !== 0xff; i++) item(`${p}[${i}]`)
          pos++
        } else for (let i = 0; i < Number(h.arg); i++) item(`${p}[${i}]`)
        return "array"
      }
      case 5: {
        const keys = []
        const types = {}
        const one = () => {
          const kStart = pos
          const kh = readHead()
          let key
          if (kh.major === 3 && kh.arg !== null) {
            key = buf.slice(pos, pos + Number(kh.arg)).toString("utf8")
            checkMinimal(kh, p)
            pos += Number(kh.arg)
          } else {
            pos = kStart
            key = `<non-text key ${buf[kStart].toString(16)}>`
            item(p + ".<key>")
          }
          keys.push(key)
          types[key] = item(p ? `${p}.${key}` : key)
        }
        if (h.arg === null) {
          indefinite.push({ path: p, major: "map" })
          while (buf[pos] !== 0xff) one()
          pos++
        } else for (let i = 0; i < Number(h.arg); i++) one()
        return { keys, types }
      }
      case 6:
        tags.push({ path: p, tag: Number(h.arg) })
        item(p)
        return `tag(${h.arg})`
      case 7: {
        if (h.ai === 20) return "false"
        if (h.ai === 21) return "true"
        if (h.ai === 22) {
          nullCount++
          return "null"
        }
        if (h.ai === 23) {
          undefinedCount++
          return "undefined"
        }
        if (h.ai >= 25 && h.ai <= 27) {
          const width = 8 << (h.ai - 24)
          const view = new DataView(buf.buffer, buf.byteOffset + h.start + 1, width / 8)
          const value =
            width === 64 ? view.getFloat64(0) : width === 32 ? view.getFloat32(0) : NaN
          numbers.push({
            path: p,
            encoding: `float${width}`,
            head: "0x" + h.ib.toString(16),
            value,
          })
          return `float${width}`
        }
        return `simple(${h.ai})`
      }
    }
  }

  const root = item("")
  if (pos !== buf.length) throw new Error(`trailing bytes after CBOR item (${pos} of ${buf.length})`)
  if (typeof root !== "object") throw new Error(`top-level item is ${root}, not a map`)
  return {
    keyOrder: root.keys,
    wire: {
      length: buf.length,
      firstByte: "0x" + buf[0].toString(16).padStart(2, "0"),
      topLevelTypes: Object.fromEntries(
        root.keys.map(k => [k, typeof root.types[k] === "object" ? "map" : root.types[k]])
      ),
      numbers,
      containsUndefined: undefinedCount > 0,
      undefinedCount,
      nullCount,
      tags,
      indefiniteLength: indefinite,
      nonMinimalHeads: nonMinimal,
    },
  }
}

// ------------------------------------------------------- fixture bookkeeping

const fixtures = []
const names = new Set()

function addFixture(name, source, bytes, note) {
  if (names.has(name)) throw new Error(`duplicate fixture name ${name}`)
  names.add(name)
  const buf = Buffer.from(bytes)
  const decoded = cbor.decode(new Uint8Array(buf))
  const { keyOrder, wire } = inspectCbor(buf)
  fixtures.push({
    name,
    file: `${name}.cbor`,
    source,
    note,
    keyOrder,
    wire,
    message: render(decoded),
    bytes: buf,
  })
}

function syncSummary(data) {
  const m = A.decodeSyncMessage(data)
  return `sync payload: ${m.heads.length} head(s), ${m.changes.length} change(s), ${m.need.length} need, ${data.length} bytes`
}

// A minimal Automerge sync peer used by the recorder and raw clients so the
// real repos see a plausible counterpart.
class MiniSync {
  docs = new Map() // documentId -> { doc, states: Map<peerId, SyncState> }
  entry(documentId) {
    let e = this.docs.get(documentId)
    if (!e) {
      e = { doc: A.init(), states: new Map() }
      this.docs.set(documentId, e)
    }
    return e
  }
  state(e, peer) {
    if (!e.states.has(peer)) e.states.set(peer, A.initSyncState())
    return e.states.get(peer)
  }
  setDoc(documentId, doc) {
    this.entry(documentId).doc = doc
  }
  generate(documentId, peer) {
    const e = this.entry(documentId)
    const [st, msg] = A.generateSyncMessage(e.doc, this.state(e, peer))
    e.states.set(peer, st)
    return msg
  }
  receive(documentId, peer, data) {
    const e = this.entry(documentId)
    const [doc, st] = A.receiveSyncMessage(e.doc, this.state(e, peer), data)
    e.doc = doc
    e.states.set(peer, st)
    return this.generate(documentId, peer)
  }
}

// Frame log with "wait until a frame matching pred has arrived".
class FrameLog {
  frames = []
  waiters = []
  push(frame) {
    this.frames.push(frame)
    for (const w of [...this.waiters]) {
      if (w.pred(frame)) {
        this.waiters.splice(this.waiters.indexOf(w), 1)
        w.resolve(frame)
      }
    }
  }
  find(pred) {
    return this.frames.find(pred)
  }
  wait(pred, ms, what) {
    const hit = this.frames.find(pred)
    if (hit) return Promise.resolve(hit)
    const w = { pred }
    const p = new Promise(resolve => (w.resolve = resolve))
    this.waiters.push(w)
    return withTimeout(p, ms, what).finally(() => {
      const i = this.waiters.indexOf(w)
      if (i >= 0) this.waiters.splice(i, 1)
    })
  }
}

function recordFrame(log, data, isBinary, extra) {
  if (!isBinary) throw new Error(`received a text frame: ${String(data).slice(0, 80)}`)
  const bytes = toU8(data)
  if (bytes.length === 0) throw new Error("received an empty binary frame")
  const msg = cbor.decode(bytes)
  const frame = { bytes, msg, ...extra }
  log.push(frame)
  return frame
}

function listen(wss) {
  return new Promise((resolve, reject) => {
    wss.once("listening", () => resolve(wss.address().port))
    wss.once("error", reject)
  })
}

function closeWss(wss) {
  for (const c of wss.clients) c.terminate()
  return new Promise(resolve => wss.close(() => resolve()))
}

// Repo.shutdown() flushes every cached handle and throws on one that never
// became ready (e.g. an unavailable document), so disconnect and flush the
// ready ones ourselves.
async function closeRepo(repo) {
  for (const adapter of repo.networkSubsystem.adapters) adapter.disconnect()
  const ready = Object.values(repo.handles)
    .filter(h => h.isReady())
    .map(h => h.documentId)
  await repo.flush(ready)
}

async function seededStorage(dir, storageId) {
  const storage = new NodeFSStorageAdapter(dir)
  await storage.save(["storage-adapter-id"], new TextEncoder().encode(storageId))
  return storage
}

const emptySyncMessage = () =>
  A.generateSyncMessage(A.init(), A.initSyncState())[1]

const freshDocumentId = () => parseAutomergeUrl(generateAutomergeUrl()).documentId

// ------------------------------------------------- phase A: real JS clients

async function captureClients(tmp) {
  const log = new FrameLog()
  const recorderSync = new MiniSync()
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 })
  const port = await listen(wss)
  const url = `ws://127.0.0.1:${port}`
  const sendTo = (ws, msg) => ws.send(cbor.encode(msg))

  wss.on("connection", ws => {
    ws.on("message", (data, isBinary) => {
      const frame = recordFrame(log, data, isBinary, {})
      const msg = frame.msg
      switch (msg.type) {
        case "join":
          sendTo(ws, {
            type: "peer",
            senderId: IDS.recorderPeer,
            peerMetadata: { storageId: IDS.recorderStorage, isEphemeral: false },
            selectedProtocolVersion: "1",
            targetId: msg.senderId,
          })
          // Ask the client to gossip heads of our own storage id to us, so the
          // real client produces remote-subscription-change and
          // remote-heads-changed frames (only acted on when gossip is enabled).
          // Sent a little later: the client only forwards subscriptions to
          // peers its (async) share policy has already accepted.
          setTimeout(() => {
            if (ws.readyState === WebSocket.OPEN)
              sendTo(ws, {
                type: "remote-subscription-change",
                senderId: IDS.recorderPeer,
                targetId: msg.senderId,
                add: [IDS.recorderStorage],
              })
          }, 100)
          break
        case "request":
          sendTo(ws, {
            type: "doc-unavailable",
            senderId: IDS.recorderPeer,
            targetId: msg.senderId,
            documentId: msg.documentId,
          })
          break
        case "sync": {
          const reply = recorderSync.receive(msg.documentId, msg.senderId, msg.data)
          if (reply)
            sendTo(ws, {
              type: "sync",
              senderId: IDS.recorderPeer,
              targetId: msg.senderId,
              documentId: msg.documentId,
              data: reply,
            })
          break
        }
        default:
          break
      }
    })
  })

  const from = peer => f => f.msg.senderId === peer

  // A1: a client without storage (ephemeral peer)
  {
    const adapter = new WebSocketClientAdapter(url)
    const repo = new Repo({ network: [adapter], peerId: IDS.clientNoStoragePeer })
    const join = await log.wait(
      f => f.msg.type === "join" && from(IDS.clientNoStoragePeer)(f),
      5000,
      "join from storage-less client"
    )
    addFixture(
      "client-join-nostorage",
      "captured-client",
      join.bytes,
      "join sent by a real Repo with WebSocketClientAdapter and no storage adapter " +
        "(peerMetadata.storageId is undefined and isEphemeral true)"
    )
    await adapter.whenReady()
    await closeRepo(repo)
  }

  // A2: a client with NodeFS storage and remote-heads gossip enabled
  const storage = await seededStorage(path.join(tmp, "client"), IDS.clientStorage)
  const adapter = new WebSocketClientAdapter(url)
  const repo = new Repo({
    network: [adapter],
    storage,
    peerId: IDS.clientStoragePeer,
    enableRemoteHeadsGossiping: true,
  })
  const mine = from(IDS.clientStoragePeer)
  const join = await log.wait(f => f.msg.type === "join" && mine(f), 5000, "join from storage client")
  addFixture(
    "client-join-storage",
    "captured-client",
    join.bytes,
    "join sent by a real Repo with NodeFSStorageAdapter (peerMetadata has a storageId UUID, isEphemeral false)"
  )
  await adapter.whenReady()

  // the recorder's subscription is passed on by the client to its generous peers
  const controlReply = await log.wait(
    f => f.msg.type === "remote-subscription-change" && mine(f),
    3000,
    "remote-subscription-change reacting to the recorder's subscription"
  )
  addFixture(
    "client-remote-subscription-change-forwarded",
    "captured-client",
    controlReply.bytes,
    "sent by the client (gossip enabled) to its generous peers after the recorder sent " +
      "remote-subscription-change {add:[recorder storageId]}; carries both add and remove arrays"
  )

  // sync: the client creates a document with a change
  const handle = repo.create({ title: "golden fixture", items: ["a", "b"], n: 42 })
  handle.change(d => {
    d.items.push("c")
  })
  const docId = handle.documentId
  const firstSync = await log.wait(
    f => f.msg.type === "sync" && mine(f) && f.msg.documentId === docId,
    5000,
    "first sync from client"
  )
  addFixture(
    "client-sync",
    "captured-client",
    firstSync.bytes,
    `first sync message the client sent for a document it created; ${syncSummary(firstSync.msg.data)}`
  )
  const changesSync = await log.wait(
    f =>
      f.msg.type === "sync" &&
      mine(f) &&
      f.msg.documentId === docId &&
      A.decodeSyncMessage(f.msg.data).changes.length > 0,
    5000,
    "sync carrying changes from client"
  )
  addFixture(
    "client-sync-with-changes",
    "captured-client",
    changesSync.bytes,
    `later sync message carrying the document's changes; ${syncSummary(changesSync.msg.data)}`
  )

  // request: find an unknown document; the recorder answers doc-unavailable
  const unknownId = freshDocumentId()
  let findOutcome
  try {
    await withTimeout(repo.find(unknownId), 5000, "repo.find of unknown doc")
    findOutcome = "resolved (unexpected)"
  } catch (e) {
    findOutcome = `rejected: ${e.message}`
  }
  const request = await log.wait(
    f => f.msg.type === "request" && mine(f) && f.msg.documentId === unknownId,
    5000,
    "request from client"
  )
  addFixture(
    "client-request",
    "captured-client",
    request.bytes,
    `request sent by repo.find() for a document id nobody has; ${syncSummary(request.msg.data)}. ` +
      `The recorder answered with {type:"doc-unavailable", senderId, targetId, documentId} and find() ${findOutcome}`
  )

  // remote-heads-changed via gossip (the recorder subscribed to its own storageId)
  const heads = await log.wait(
    f =>
      f.msg.type === "remote-heads-changed" &&
      mine(f) &&
      Object.values(f.msg.newHeads ?? {}).some(h => h.heads.length > 0),
    5000,
    "remote-heads-changed from client"
  )
  addFixture(
    "client-remote-heads-changed",
    "captured-client",
    heads.bytes,
    "sent by the client (gossip enabled) after the recorder, which subscribed to its own storageId, " +
      "synced the document; timestamp is Date.now() on the client"
  )

  repo.subscribeToRemotes([IDS.rawStorageA])
  const subAdd = await log.wait(
    f =>
      f.msg.type === "remote-subscription-change" &&
      mine(f) &&
      (f.msg.add ?? []).includes(IDS.rawStorageA),
    3000,
    "remote-subscription-change from subscribeToRemotes"
  )
  addFixture(
    "client-remote-subscription-change-add",
    "captured-client",
    subAdd.bytes,
    "sent by repo.subscribeToRemotes([storageId]); the remove field is present with value undefined"
  )

  // ephemeral: handle.broadcast
  const isEph = f => f.msg.type === "ephemeral" && mine(f) && f.msg.documentId === docId
  const payloadOf = f => cbor.decode(f.msg.data)
  handle.broadcast({ cursor: { line: 3, column: 14 }, user: "alice" })
  const eph = await log.wait(
    f => isEph(f) && "cursor" in payloadOf(f),
    3000,
    "ephemeral from handle.broadcast"
  )
  addFixture(
    "client-ephemeral",
    "captured-client",
    eph.bytes,
    "ephemeral sent by handle.broadcast({cursor:{line:3,column:14},user:'alice'}); " +
      "data is the cbor-encoded payload; count/sessionId/senderId are added by NetworkSubsystem"
  )

  // presence (automerge-repo 2.5): ephemeral messages with a __presence payload
  const presence = new Presence({ handle })
  const isPresence = type => f => isEph(f) && payloadOf(f).__presence?.type === type
  presence.start({ initialState: { name: "alice", color: "#ff0000" }, heartbeatMs: 150 })
  const snap = await log.wait(isPresence("snapshot"), 3000, "presence snapshot")
  presence.broadcast("cursor", { line: 1, column: 2 })
  const upd = await log.wait(isPresence("update"), 3000, "presence update")
  const hb = await log.wait(isPresence("heartbeat"), 3000, "presence heartbeat")
  presence.stop()
  const bye = await log.wait(isPresence("goodbye"), 3000, "presence goodbye")
  const pnote = kind =>
    `ephemeral sent by Presence (automerge-repo 2.5) — ${kind}; data decodes to {__presence:{type:...}}`
  addFixture("client-presence-snapshot", "captured-client", snap.bytes, pnote("start() broadcasts a snapshot of the whole local state"))
  addFixture("client-presence-update", "captured-client", upd.bytes, pnote("broadcast(channel, value) sends an update"))
  addFixture("client-presence-heartbeat", "captured-client", hb.bytes, pnote("periodic heartbeat (heartbeatMs set to 150 here; 15000 by default)"))
  addFixture("client-presence-goodbye", "captured-client", bye.bytes, pnote("stop() sends goodbye"))

  await closeRepo(repo)
  await closeWss(wss)
  return log
}

// ------------------------------------------------- phase B: real JS servers

function rawClient(url, senderId, sync) {
  const log = new FrameLog()
  const ws = new WebSocket(url)
  const client = {
    ws,
    log,
    senderId,
    closed: new Promise(resolve => ws.once("close", (code, reason) => resolve({ code, reason: String(reason) }))),
    send(msg) {
      ws.send(cbor.encode(msg))
    },
    join(extra = {}, versions = ["1"]) {
      const msg = { type: "join", senderId, peerMetadata: extra.peerMetadata ?? {} }
      if (versions !== null) msg.supportedProtocolVersions = versions
      client.send(msg)
    },
    close() {
      ws.terminate()
    },
  }
  ws.on("message", (data, isBinary) => {
    const frame = recordFrame(log, data, isBinary, {})
    const msg = frame.msg
    if (sync && (msg.type === "sync" || msg.type === "request")) {
      const reply = sync.receive(msg.documentId, msg.senderId, msg.data)
      if (reply)
        client.send({ type: "sync", senderId, targetId: msg.senderId, documentId: msg.documentId, data: reply })
    }
  })
  return new Promise((resolve, reject) => {
    ws.once("open", () => resolve(client))
    ws.once("error", reject)
  })
}

async function captureRelayServer(tmp) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 })
  const port = await listen(wss)
  const url = `ws://127.0.0.1:${port}`
  const storage = await seededStorage(path.join(tmp, "relay"), IDS.relayStorage)
  // Configured like a typical sync server: stores everything, announces nothing.
  const repo = new Repo({
    network: [new WebSocketServerAdapter(wss)],
    storage,
    peerId: IDS.relayPeer,
    sharePolicy: async () => false,
  })
  const served = repo.create({ text: "hello from the relay", list: [1, 2, 3] })
  served.change(d => {
    d.list.push(4)
  })
  await repo.flush()
  const servedId = served.documentId

  const isType = t => f => f.msg.type === t

  // peer reply to a normal join
  const c1sync = new MiniSync()
  const c1 = await rawClient(url, "raw-client-1", c1sync)
  c1.join({ peerMetadata: { storageId: IDS.rawStorageA, isEphemeral: false } })
  const peer = await c1.log.wait(isType("peer"), 5000, "peer reply from relay")
  addFixture(
    "server-peer",
    "captured-server",
    peer.bytes,
    "peer reply of a real Repo + WebSocketServerAdapter (with NodeFS storage) to a join with supportedProtocolVersions ['1']"
  )

  // doc-unavailable for a request of an unknown document
  const unknownId = freshDocumentId()
  c1.send({
    type: "request",
    senderId: c1.senderId,
    targetId: IDS.relayPeer,
    documentId: unknownId,
    data: emptySyncMessage(),
  })
  const unavailable = await c1.log.wait(
    f => f.msg.type === "doc-unavailable" && f.msg.documentId === unknownId,
    5000,
    "doc-unavailable from relay"
  )
  addFixture(
    "server-doc-unavailable",
    "captured-server",
    unavailable.bytes,
    "relay's answer to a request (data = empty-doc sync message) for a document it does not have"
  )

  // sync reply for a document the relay has
  c1.send({
    type: "request",
    senderId: c1.senderId,
    targetId: IDS.relayPeer,
    documentId: servedId,
    data: c1sync.generate(servedId, IDS.relayPeer),
  })
  const syncReply = await c1.log.wait(
    f => f.msg.type === "sync" && f.msg.documentId === servedId,
    5000,
    "sync reply from relay"
  )
  addFixture(
    "server-sync",
    "captured-server",
    syncReply.bytes,
    `relay's first reply to a request for a document it stores; ${syncSummary(syncReply.msg.data)}`
  )
  // Usually the first reply already carries the changes (the request said we
  // have nothing); if not, also keep the first one that does.
  if (A.decodeSyncMessage(syncReply.msg.data).changes.length === 0) {
    const syncChanges = await c1.log.wait(
      f =>
        f.msg.type === "sync" &&
        f.msg.documentId === servedId &&
        A.decodeSyncMessage(f.msg.data).changes.length > 0,
      5000,
      "sync with changes from relay"
    )
    addFixture(
      "server-sync-with-changes",
      "captured-server",
      syncChanges.bytes,
      `relay's sync message carrying the document's changes; ${syncSummary(syncChanges.msg.data)}`
    )
  }

  // ephemeral relayed from another peer of the same document
  const c4sync = new MiniSync()
  const c4 = await rawClient(url, "raw-client-4", c4sync)
  c4.join({ peerMetadata: { isEphemeral: true } })
  await c4.log.wait(isType("peer"), 5000, "peer reply to raw-client-4")
  c4.send({
    type: "request",
    senderId: c4.senderId,
    targetId: IDS.relayPeer,
    documentId: servedId,
    data: c4sync.generate(servedId, IDS.relayPeer),
  })
  await c4.log.wait(
    f => f.msg.type === "sync" && f.msg.documentId === servedId,
    5000,
    "sync reply to raw-client-4"
  )
  c4.send({
    type: "ephemeral",
    senderId: c4.senderId,
    targetId: IDS.relayPeer,
    documentId: servedId,
    data: cbor.encode({ hello: "from raw-client-4" }),
    count: 1,
    sessionId: "rawsession4",
  })
  const relayed = await c1.log.wait(
    f => f.msg.type === "ephemeral" && f.msg.senderId === "raw-client-4",
    5000,
    "relayed ephemeral"
  )
  addFixture(
    "server-ephemeral-relayed",
    "captured-server",
    relayed.bytes,
    "ephemeral sent by raw-client-4 (keys: type, senderId, targetId, documentId, data, count, sessionId) " +
      "and forwarded by the relay to raw-client-1: the relay re-encodes {...message, targetId}"
  )

  // error for a join without "1" in supportedProtocolVersions
  const c2 = await rawClient(url, "raw-client-2")
  c2.join({ peerMetadata: {} }, ["2"])
  const error = await c2.log.wait(isType("error"), 5000, "error reply from relay")
  const closed = await withTimeout(c2.closed, 5000, "relay closing after error")
  addFixture(
    "server-error-unsupported-version",
    "captured-server",
    error.bytes,
    `relay's answer to a join with supportedProtocolVersions ['2']; the server then closed the socket (close code ${closed.code})`
  )

  // lenient: a join without supportedProtocolVersions still gets a peer
  const c3 = await rawClient(url, "raw-client-3")
  c3.join({ peerMetadata: {} }, null)
  const peerNoVersions = await c3.log.wait(isType("peer"), 5000, "peer reply to versionless join")
  addFixture(
    "server-peer-to-versionless-join",
    "captured-server",
    peerNoVersions.bytes,
    "relay's answer to a join that has no supportedProtocolVersions key (treated as version 1)"
  )

  for (const c of [c1, c3, c4]) c.close()
  await closeRepo(repo)
  await closeWss(wss)
}

async function captureGossipServer() {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 })
  const port = await listen(wss)
  const url = `ws://127.0.0.1:${port}`
  // No storage (so its peerMetadata has storageId undefined), announce to
  // everyone (default share policy), remote-heads gossip on.
  const repo = new Repo({
    network: [new WebSocketServerAdapter(wss)],
    peerId: IDS.gossipPeer,
    enableRemoteHeadsGossiping: true,
  })
  const isType = t => f => f.msg.type === t

  const aSync = new MiniSync()
  let doc = A.from({ owner: "raw-client-a", tags: ["x"] })
  doc = A.change(doc, d => {
    d.tags.push("y")
  })
  const docId = freshDocumentId()
  aSync.setDoc(docId, doc)

  const a = await rawClient(url, "raw-client-a", aSync)
  a.join({ peerMetadata: { storageId: IDS.rawStorageA, isEphemeral: false } })
  const peer = await a.log.wait(isType("peer"), 5000, "peer from gossip server")
  addFixture(
    "server-peer-nostorage",
    "captured-server",
    peer.bytes,
    "peer reply of a real Repo + WebSocketServerAdapter with no storage adapter (peerMetadata.storageId undefined, isEphemeral true)"
  )

  const bSync = new MiniSync()
  const b = await rawClient(url, "raw-client-b", bSync)
  b.join({ peerMetadata: { storageId: IDS.rawStorageB, isEphemeral: false } })
  await b.log.wait(isType("peer"), 5000, "peer reply to raw-client-b")
  await sleep(50)

  // b subscribes to a's storage id; the server passes it on to generous peers
  b.send({ type: "remote-subscription-change", senderId: b.senderId, targetId: IDS.gossipPeer, add: [IDS.rawStorageA] })
  const sub = await a.log.wait(isType("remote-subscription-change"), 5000, "server remote-subscription-change")
  addFixture(
    "server-remote-subscription-change",
    "captured-server",
    sub.bytes,
    "sent by a gossip-enabled server to its generous peers after raw-client-b subscribed to raw-client-a's storageId"
  )

  // b asks for the doc (only a has it): the server requests it from a
  b.send({
    type: "request",
    senderId: b.senderId,
    targetId: IDS.gossipPeer,
    documentId: docId,
    data: bSync.generate(docId, IDS.gossipPeer),
  })
  const req = await a.log.wait(
    f => f.msg.type === "request" && f.msg.documentId === docId,
    5000,
    "server request to raw-client-a"
  )
  addFixture(
    "server-request",
    "captured-server",
    req.bytes,
    `request the server sent to another peer for a document it lacks after raw-client-b requested it; ${syncSummary(req.msg.data)}`
  )

  const rhc = await b.log.wait(
    f => f.msg.type === "remote-heads-changed" && f.msg.documentId === docId,
    5000,
    "server remote-heads-changed to raw-client-b"
  )
  addFixture(
    "server-remote-heads-changed",
    "captured-server",
    rhc.bytes,
    "sent by a gossip-enabled server to raw-client-b (subscribed to raw-client-a's storageId and to the doc) " +
      "once it learned raw-client-a's heads; timestamp is Date.now() on the server"
  )

  a.close()
  b.close()
  await closeRepo(repo)
  await closeWss(wss)
}

// ----------------------------------------------------- synthetic encodings

function synthesize() {
  const docId = freshDocumentId()
  let doc = A.from({ k: "v" })
  doc = A.change(doc, d => {
    d.k = "w"
  })
  const heads = encodeHeads(A.getHeads(doc))
  const syn = (name, msg, note) => addFixture(name, "synthetic", cbor.encode(msg), note)

  syn(
    "synthetic-remote-subscription-change",
    {
      type: "remote-subscription-change",
      targetId: "peer-b",
      add: [IDS.rawStorageA, IDS.rawStorageB],
      remove: [IDS.relayStorage],
      senderId: "peer-a",
    },
    "remote-subscription-change with both add and remove arrays, keys in the order Repo builds them"
  )
  syn(
    "synthetic-remote-heads-changed",
    {
      type: "remote-heads-changed",
      targetId: "peer-b",
      documentId: docId,
      newHeads: { [IDS.rawStorageA]: { heads, timestamp: Date.now() } },
      senderId: "peer-a",
    },
    "remote-heads-changed with base58check head hashes; timestamp = Date.now() (> 2^32, so cbor-x writes float64)"
  )
  syn("synthetic-leave", { type: "leave", senderId: "peer-a" }, "leave (never sent by the JS adapters; accept and ignore)")
  syn(
    "synthetic-ephemeral-big-count",
    {
      type: "ephemeral",
      targetId: "peer-b",
      documentId: docId,
      data: cbor.encode({ big: true }),
      count: 2 ** 32 + 7,
      sessionId: "bigcountsession",
      senderId: "peer-a",
    },
    "ephemeral whose count is 2^32+7: cbor-x writes integers above 32 bits as float64"
  )
  syn(
    "synthetic-join-ephemeral-peer",
    {
      type: "join",
      senderId: "peer-a",
      peerMetadata: { isEphemeral: true },
      supportedProtocolVersions: ["1"],
    },
    "join with peerMetadata {isEphemeral: true} and no storageId key"
  )
  syn(
    "synthetic-join-no-versions",
    { type: "join", senderId: "peer-a", peerMetadata: { storageId: IDS.rawStorageA, isEphemeral: false } },
    "join without supportedProtocolVersions (the JS server treats this as version 1)"
  )
  syn(
    "synthetic-join-undefined-field",
    {
      type: "join",
      senderId: "peer-a",
      peerMetadata: { storageId: undefined, isEphemeral: false },
      supportedProtocolVersions: ["1"],
      targetId: undefined,
    },
    "join whose optional fields (peerMetadata.storageId and a top-level targetId) are CBOR undefined (0xf7)"
  )
  syn(
    "synthetic-join-unknown-key",
    {
      type: "join",
      senderId: "peer-a",
      peerMetadata: { storageId: IDS.rawStorageA, isEphemeral: false, futureFlag: 7 },
      supportedProtocolVersions: ["1", "2"],
      extension: { nested: [1, "two", new Uint8Array([3])] },
    },
    "join with unknown extra keys at the top level and in peerMetadata, and an extra protocol version"
  )
  syn(
    "synthetic-join-metadata-alias",
    {
      type: "join",
      senderId: "peer-a",
      metadata: { storageId: IDS.rawStorageA, isEphemeral: false },
      supportedProtocolVersions: ["1"],
    },
    "join that uses `metadata` (as in the automerge-repo README) instead of `peerMetadata`"
  )
}

// ------------------------------------------------------------------- main

async function main() {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "converge-fixtures-"))
  // Removed only when the process exits: automerge-repo saves sync state on
  // a throttle timer that can fire after the repos are flushed, and a write
  // into a deleted folder would crash the script.
  process.on("exit", () => fs.rmSync(tmp, { recursive: true, force: true }))
  await captureClients(tmp)
  await captureRelayServer(tmp)
  await captureGossipServer()
  synthesize()

  fs.mkdirSync(OUT_DIR, { recursive: true })
  for (const f of fs.readdirSync(OUT_DIR)) {
    if (f.endsWith(".cbor") || f === "manifest.json") fs.rmSync(path.join(OUT_DIR, f))
  }
  const manifest = []
  for (const fx of fixtures) {
    fs.writeFileSync(path.join(OUT_DIR, fx.file), fx.bytes)
    const { bytes, ...entry } = fx
    manifest.push(entry)
  }
  fs.writeFileSync(path.join(OUT_DIR, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n")

  const version = p =>
    JSON.parse(fs.readFileSync(path.join(HERE, "node_modules", p, "package.json"), "utf8")).version
  console.log(
    `wrote ${fixtures.length} fixtures to ${path.relative(process.cwd(), OUT_DIR) || "."} ` +
      `(automerge-repo ${version("@automerge/automerge-repo")}, ` +
      `network-websocket ${version("@automerge/automerge-repo-network-websocket")}, ` +
      `automerge ${version("@automerge/automerge")}, cbor-x ${version("cbor-x")}, ws ${version("ws")})`
  )
  for (const fx of fixtures) console.log(`  ${fx.source.padEnd(16)} ${fx.name}`)
}

main().then(
  () => {
    // Everything has been closed; the process should now exit by itself. The
    // unref'd hard timer fires (and fails loudly) if something is still open.
  },
  err => {
    console.error("gen-fixtures: FAILED:", err)
    process.exit(1)
  }
)
