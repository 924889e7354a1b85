// Ephemeral (presence-style) messages through the relay.
//
//   node interop-ephemeral.mjs <wsUrl> <automergeUrl> send
//   node interop-ephemeral.mjs <wsUrl> <automergeUrl> receive
//   node interop-ephemeral.mjs <wsUrl> <automergeUrl|new> both
//
// send:    find the doc, handle.broadcast({hello:"from js", n: 1}) every
//          200 ms; after INTEROP_SEND_MS (default 5000) or on SIGTERM/SIGINT
//          print {"ok":true,"peerId":...,"sessionId":...,"sent":N} and exit 0.
// receive: find the doc, wait for one "ephemeral-message" event and print
//          {"ok":true,"senderId":...,"message":...,"count":...,"sessionId":...}.
// both:    two JS clients through the relay: A broadcasts every 200 ms until
//          B receives; B's event must name A's peerId as sender, and the
//          wire count/sessionId must be the ones A stamped. With "new" as the
//          URL, A creates the document first.
//
// Note: the DocHandle "ephemeral-message" event only carries
// {handle, senderId, message}. count and sessionId exist only on the wire
// message, so they are read from the websocket adapter's own "message"
// events (RecordingClientAdapter in interop-lib.mjs).

import {
  setup, succeed, fail, usage, errText, waiting, until, timer, sleep, envInt, elapsed, log,
  connectClient, deepEqual,
} from "./interop-lib.mjs"
import { isValidAutomergeUrl } from "@automerge/automerge-repo"

setup("interop-ephemeral")

const [wsUrl, url, mode] = process.argv.slice(2)
if (!wsUrl || !url || !["send", "receive", "both"].includes(mode))
  usage("node interop-ephemeral.mjs <wsUrl> <automergeUrl> send|receive|both")

const PAYLOAD = { hello: "from js", n: 1 }
const PERIOD_MS = 200

async function findOrFail(client, docUrl) {
  waiting(`${client.label}: repo.find(${docUrl}) through the relay`)
  try {
    return await client.repo.find(docUrl)
  } catch (e) {
    throw new Error(`${client.label}: repo.find failed: ${errText(e)}`)
  }
}

function outboundEphemerals(client) {
  return client.adapter.sent.filter(m => m.type === "ephemeral")
}

// The wire message behind a received event (same sender, same payload).
// Our adapter listener runs before the handle event is emitted, so the
// matching message is already recorded.
function wireFor(client, documentId, senderId) {
  const msgs = client.adapter.received.filter(
    m => m.type === "ephemeral" && m.documentId === documentId && m.senderId === senderId
  )
  return msgs[msgs.length - 1]
}

function startBroadcasting(handle) {
  let sent = 0
  const tick = () => {
    handle.broadcast(PAYLOAD)
    sent++
  }
  tick()
  timer(tick, PERIOD_MS, { repeat: true })
  return () => sent
}

async function send() {
  if (!isValidAutomergeUrl(url)) return fail(`not a valid automerge URL: ${url}`)
  const c = await connectClient(wsUrl, "sender")
  const h = await findOrFail(c, url)
  const sentCount = startBroadcasting(h)
  const report = reason => {
    const out = outboundEphemerals(c)
    succeed({
      mode,
      url,
      peerId: c.repo.peerId,
      sessionId: out[0]?.sessionId,
      broadcasts: sentCount(),
      sent: out.length,
      lastCount: out[out.length - 1]?.count,
      stoppedBy: reason,
    })
  }
  process.on("SIGTERM", () => report("SIGTERM"))
  process.on("SIGINT", () => report("SIGINT"))
  const ms = envInt("INTEROP_SEND_MS", 5000)
  waiting(`send period of ${ms} ms to end`)
  await sleep(ms)
  report("duration")
}

async function receive() {
  if (!isValidAutomergeUrl(url)) return fail(`not a valid automerge URL: ${url}`)
  const c = await connectClient(wsUrl, "receiver")
  const h = await findOrFail(c, url)
  let event
  h.on("ephemeral-message", e => {
    if (!event) event = e
  })
  await until("an ephemeral message for the document", () => event, {
    events: [[h, "ephemeral-message"]],
  })
  const wire = wireFor(c, h.documentId, event.senderId)
  succeed({
    mode,
    url,
    peerId: c.repo.peerId,
    senderId: event.senderId,
    message: event.message,
    count: wire?.count,
    sessionId: wire?.sessionId,
    documentId: wire?.documentId,
    targetId: wire?.targetId,
    eventFields: Object.keys(event),
  })
}

async function both() {
  const a = await connectClient(wsUrl, "A")
  const b = await connectClient(wsUrl, "B")
  let docUrl = url
  if (url === "new") {
    docUrl = a.repo.create({ ephemeralTest: true }).url
  } else if (!isValidAutomergeUrl(url)) {
    return fail(`not a valid automerge URL: ${url}`)
  }
  const ha = await findOrFail(a, docUrl)
  const hb = await findOrFail(b, docUrl)

  let event
  hb.on("ephemeral-message", e => {
    if (!event) event = e
  })
  let echoedToA = 0
  ha.on("ephemeral-message", e => {
    if (e.senderId === a.repo.peerId) echoedToA++
  })

  const t0 = elapsed()
  const sentCount = startBroadcasting(ha)
  await until("B to receive A's ephemeral message", () => event, {
    events: [[hb, "ephemeral-message"]],
  })
  const latencyMs = elapsed() - t0

  const wire = wireFor(b, hb.documentId, event.senderId)
  const aOut = outboundEphemerals(a)
  const problems = []
  if (event.senderId !== a.repo.peerId)
    problems.push(`senderId ${event.senderId} is not A's peerId ${a.repo.peerId}`)
  if (!deepEqual(event.message, PAYLOAD))
    problems.push(`payload ${JSON.stringify(event.message)} differs from ${JSON.stringify(PAYLOAD)}`)
  if (!wire) problems.push("no matching ephemeral message seen on B's websocket")
  else {
    if (wire.sessionId !== aOut[0]?.sessionId)
      problems.push(`sessionId ${wire.sessionId} is not A's ${aOut[0]?.sessionId}`)
    if (!aOut.some(m => m.count === wire.count))
      problems.push(`count ${wire.count} was never sent by A`)
  }
  // Give a stray echo a moment to show up, for the report.
  await sleep(300)
  if (problems.length) return fail(problems.join("; "), { senderId: event.senderId, wire })
  log(`B received after ${latencyMs} ms, A broadcast ${sentCount()} times`)
  succeed({
    mode,
    url: docUrl,
    senderId: event.senderId,
    aPeerId: a.repo.peerId,
    bPeerId: b.repo.peerId,
    message: event.message,
    count: wire.count,
    sessionId: wire.sessionId,
    aSessionId: aOut[0]?.sessionId,
    broadcastsBeforeReceipt: aOut.filter(m => m.at <= wire.at).length,
    latencyMs,
    echoedToSender: echoedToA,
    eventFields: Object.keys(event),
  })
}

const run = { send, receive, both }[mode]
run().catch(e => fail(errText(e)))
