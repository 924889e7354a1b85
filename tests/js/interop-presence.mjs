// automerge-repo's Presence API against another implementation's presence.
//
//   node interop-presence.mjs <wsUrl> <automergeUrl> <otherPeerId>
//
// 1. Connect to the relay, find the document (retrying every 300 ms until
//    the hard timeout, since it may not be on the relay yet; each retry
//    uses a fresh connection, see findWithRetry).
// 2. new Presence({handle}).start({initialState: {name: "js", color: "blue"},
//    heartbeatMs: 500, peerTtlMs: 2000}); stderr line
//    `interop-event {"event":"started","peerId":...}`.
// 3. Wait until <otherPeerId> is in getPeerStates() with state.name "rust"
//    -> `interop-event {"event":"saw-peer","state":{...}}`, then
//    presence.broadcast("cursor", {line: 3}) once.
// 4. Wait until that peer's state has cursor {"line":7}
//    -> `interop-event {"event":"saw-cursor"}`.
// 5. Wait until the peer is gone from getPeerStates() WITHOUT a goodbye (it
//    is expected to go silent; a goodbye fails the test since the TTL path
//    would not have been exercised), then print
//    {"ok":true,"peerId":...,"sawState":{...},"cursor":{...},"goneAfterMs":N}
//    where goneAfterMs = time of removal - peer's last lastSeenAt.
//
// presence.stop() is never called: it is the only thing that sends
// "goodbye" (repo.shutdown() / adapter.disconnect() know nothing about
// Presence), so the other side must notice our silence by its own TTL.
//
// How automerge-repo 2.5.6 Presence works (dist/presence/*.js):
// * every message is handle.broadcast({__presence: M}) (an "ephemeral"
//   message, CBOR data) with M one of
//     {type:"snapshot", state:{...}}      on start() and on announce
//     {type:"update", channel, value}     on broadcast(channel, value)
//     {type:"heartbeat"}                  every heartbeatMs without a send
//     {type:"goodbye"}                    on stop() only
// * any presence message from a peer not currently known triggers
//   "announce": our full snapshot is re-broadcast 500 ms later.
// * heartbeats from unknown peers are ignored (only refresh lastSeenAt of
//   a known peer); update/snapshot add/merge state and refresh both
//   lastSeenAt and lastActiveAt.
// * pruning runs on an interval of heartbeatMs (not peerTtlMs) and drops
//   peers with lastSeenAt < now - peerTtlMs, emitting "pruning"; so a silent
//   peer disappears between peerTtlMs and peerTtlMs + heartbeatMs after it
//   was last seen.
// * getPeerStates() returns a PeerStateView; its .value is
//   {[peerId]: {peerId, lastSeenAt, lastActiveAt, value: state}}.

import {
  setup, succeed, fail, usage, errText, waiting, until, sleep, log, elapsed,
  connectClient, deepEqual, documentIdOf,
} from "./interop-lib.mjs"
import { Presence, isValidAutomergeUrl } from "@automerge/automerge-repo"

setup("interop-presence")

const [wsUrl, url, otherPeerId] = process.argv.slice(2)
if (!wsUrl || !url || !otherPeerId)
  usage("node interop-presence.mjs <wsUrl> <automergeUrl> <otherPeerId>")

const INITIAL_STATE = { name: "js", color: "blue" }
const HEARTBEAT_MS = 500
const PEER_TTL_MS = 2000
const FIND_RETRY_MS = 300
const OUR_CURSOR = { line: 3 }
const WANTED_CURSOR = { line: 7 }

// Harness marker: one stderr line, never silenced by INTEROP_QUIET.
function event(name, fields = {}) {
  process.stderr.write("interop-event " + JSON.stringify({ event: name, ...fields }) + "\n")
}

// repo.find() rejects once the relay says doc-unavailable, and a cached
// handle in state "unavailable" makes every later find() on that Repo reject
// at once without asking again (unavailable -> ready is the only way out,
// and repo.removeFromCache() throws for a handle that is not ready). So
// between attempts: use the old handle if the document arrived by itself
// (the reference server pushes it to peers that asked), else drop that
// client and ask again from a fresh one.
async function findWithRetry(wsUrl, docUrl) {
  const documentId = documentIdOf(docUrl)
  let attempts = 0
  for (;;) {
    attempts++
    const client = await connectClient(wsUrl, attempts === 1 ? "presence" : `presence (find attempt ${attempts})`)
    waiting(`repo.find(${docUrl}) through the relay (attempt ${attempts})`)
    try {
      return { client, handle: await client.repo.find(docUrl), attempts }
    } catch (e) {
      log(`find attempt ${attempts} failed: ${errText(e)}; retrying in ${FIND_RETRY_MS} ms`)
    }
    await sleep(FIND_RETRY_MS)
    const cached = client.repo.handles[documentId]
    if (cached?.isReady()) return { client, handle: cached, attempts }
    log(`dropping client ${client.repo.peerId}; the next attempt uses a fresh connection`)
    try {
      const p = client.repo.shutdown()
      if (p && typeof p.catch === "function") p.catch(() => {})
    } catch {
      // already closed
    }
  }
}

async function main() {
  if (!isValidAutomergeUrl(url)) return fail(`not a valid automerge URL: ${url}`)

  const { client: c, handle, attempts } = await findWithRetry(wsUrl, url)
  log(`found ${url} after ${attempts} attempt(s)`)

  const presence = new Presence({ handle })
  const received = { snapshot: 0, update: 0, heartbeat: 0, goodbye: 0 }
  const peerEntry = () => presence.getPeerStates().value[otherPeerId]

  // lastSeenAt of the other peer as of its latest message; Presence emits
  // its events after updating its peer table, so the entry is current here.
  let lastSeenAt
  let goneAt
  let goneVia
  const noteSeen = () => {
    const e = peerEntry()
    if (e) lastSeenAt = e.lastSeenAt
  }
  for (const type of ["snapshot", "update", "heartbeat"]) {
    presence.on(type, e => {
      if (e.peerId !== otherPeerId) return
      received[type]++
      noteSeen()
    })
  }
  presence.on("goodbye", e => {
    if (e.peerId !== otherPeerId) return
    received.goodbye++
    if (goneAt === undefined) {
      goneAt = Date.now()
      goneVia = "goodbye"
    }
  })
  presence.on("pruning", e => {
    if (e.pruned.includes(otherPeerId) && goneAt === undefined) {
      goneAt = Date.now()
      goneVia = "ttl"
    }
  })

  presence.start({ initialState: INITIAL_STATE, heartbeatMs: HEARTBEAT_MS, peerTtlMs: PEER_TTL_MS })
  event("started", { peerId: c.repo.peerId, documentId: handle.documentId })

  const presenceEvents = ["snapshot", "update", "heartbeat"].map(n => [presence, n])

  const seen = await until(
    `peer ${otherPeerId} to appear in presence with state.name === "rust"`,
    () => {
      const e = peerEntry()
      return e && e.value?.name === "rust" ? e : undefined
    },
    { events: presenceEvents }
  )
  noteSeen()
  const sawState = structuredClone(seen.value)
  event("saw-peer", { peerId: otherPeerId, state: sawState })

  presence.broadcast("cursor", OUR_CURSOR)
  log(`broadcast cursor ${JSON.stringify(OUR_CURSOR)}`)

  const withCursor = await until(
    `peer ${otherPeerId} state to have cursor ${JSON.stringify(WANTED_CURSOR)}`,
    () => {
      const e = peerEntry()
      return e && deepEqual(e.value?.cursor, WANTED_CURSOR) ? e : undefined
    },
    { events: presenceEvents }
  )
  noteSeen()
  const cursor = structuredClone(withCursor.value.cursor)
  event("saw-cursor", { peerId: otherPeerId, cursor })

  const tGoneWait = elapsed()
  await until(
    `peer ${otherPeerId} to be pruned from presence after going silent (ttl ${PEER_TTL_MS} ms)`,
    () => {
      if (peerEntry()) {
        noteSeen()
        return false
      }
      if (goneAt === undefined) {
        // Removed without an event we saw (should not happen); time it now.
        goneAt = Date.now()
        goneVia = "unknown"
      }
      return true
    },
    { events: [[presence, "pruning"], [presence, "goodbye"], ...presenceEvents] }
  )

  // Silence our own timers without stop() (which would send "goodbye").
  // These are TypeScript-private but plain methods at runtime, and send
  // nothing. The Repo is shut down by succeed()/fail() anyway.
  for (const m of ["stopHeartbeats", "stopPruningPeers"]) {
    if (typeof presence[m] === "function") presence[m]()
  }

  const goneAfterMs = goneAt - lastSeenAt
  if (goneVia === "goodbye")
    return fail("the peer sent a presence goodbye instead of going silent; the TTL path was not exercised", {
      received,
    })
  if (!(goneAfterMs >= PEER_TTL_MS))
    return fail(`peer vanished ${goneAfterMs} ms after it was last seen, before the ${PEER_TTL_MS} ms TTL`, {
      goneVia,
      received,
    })
  event("peer-gone", { peerId: otherPeerId, goneAfterMs, via: goneVia })

  succeed({
    peerId: c.repo.peerId,
    otherPeerId,
    sawState,
    cursor,
    goneAfterMs,
    goneVia,
    waitedForGoneMs: elapsed() - tGoneWait,
    heartbeatMs: HEARTBEAT_MS,
    peerTtlMs: PEER_TTL_MS,
    findAttempts: attempts,
    received,
  })
}

main().catch(e => fail(errText(e)))
