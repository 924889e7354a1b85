// How automerge-repo reports a document the relay does not have.
//
//   node interop-unavailable.mjs <wsUrl>
//   node interop-unavailable.mjs <wsUrl> later <automergeUrl>
//
// Default mode: repo.find() on a random, never-created URL must be reported
// unavailable: {"ok":true,"unavailable":true,"how":"rejected",...}.
//
// "later" mode: repo.find(<automergeUrl>) must first be reported unavailable
// (a stderr line `interop-event {"event":"unavailable",...}` marks that
// moment for the harness). The Repo stays connected and the script waits
// until the document arrives (another client creates it on the relay), then
// prints {"ok":true,"arrivedLater":true,"doc":...}.
//
// What automerge-repo 2.5.6 does (read from dist/Repo.js, DocHandle.js,
// synchronizer/DocSynchronizer.js):
// * repo.find() sends a "request" and REJECTS with
//   Error("Document <url> is unavailable") once every connected peer said
//   "doc-unavailable"; the DocHandle (still in repo.handles) is then in state
//   "unavailable" and its doc is reset to empty.
// * The handle state machine allows unavailable -> ready: any later sync
//   message carrying changes makes the handle ready and emits "change".
// * automerge-repo never re-requests by itself (only after a reconnect, when
//   it re-syncs every known document with the new peer). Calling repo.find()
//   again does NOT help either: a cached handle in state "unavailable" makes
//   find() reject immediately without sending anything.
// So arrival is detected by keeping the cached handle (repo.handles[id]) and
// waiting for its "change" event / isReady(); it only works if the relay
// pushes the document to peers that asked for it, as the reference server
// does (it keeps the requester in the document's peer list).

import {
  setup, succeed, fail, usage, errText, waiting, until, elapsed, log,
  connectClient, docJson, documentIdOf,
} from "./interop-lib.mjs"
import { generateAutomergeUrl, isValidAutomergeUrl } from "@automerge/automerge-repo"

setup("interop-unavailable")

const [wsUrl, mode, laterUrl] = process.argv.slice(2)
if (!wsUrl || (mode !== undefined && mode !== "later") || (mode === "later" && !laterUrl))
  usage("node interop-unavailable.mjs <wsUrl> [later <automergeUrl>]")

// repo.find on a URL the relay lacks; resolves with how it was reported.
async function findExpectingUnavailable(client, url) {
  waiting(`repo.find(${url}) to be reported unavailable`)
  const t0 = elapsed()
  try {
    const h = await client.repo.find(url)
    return { found: true, handle: h, ms: elapsed() - t0 }
  } catch (e) {
    const ms = elapsed() - t0
    const handle = client.repo.handles[documentIdOf(url)]
    return {
      found: false,
      ms,
      message: errText(e),
      handle,
      state: handle?.state,
      relaySentDocUnavailable: client.adapter.received.some(
        m => m.type === "doc-unavailable" && m.documentId === documentIdOf(url)
      ),
      sentRequest: client.adapter.sent.some(
        m => m.type === "request" && m.documentId === documentIdOf(url)
      ),
    }
  }
}

async function plain() {
  const c = await connectClient(wsUrl, "client")
  const url = generateAutomergeUrl()
  const r = await findExpectingUnavailable(c, url)
  if (r.found) return fail(`a random document was reported as found: ${url}`)
  if (!/unavailable/i.test(r.message)) return fail(`repo.find failed, but not as unavailable: ${r.message}`)
  if (r.state !== "unavailable") return fail(`find rejected but handle state is ${r.state}`)
  // automerge-repo also gives up when it has no peer left; make sure it was
  // the relay that answered.
  if (!r.relaySentDocUnavailable)
    return fail("reported unavailable, but the relay never sent doc-unavailable (connection lost?)")
  succeed({
    unavailable: true,
    url,
    how: "rejected",
    error: r.message,
    handleState: r.state,
    sentRequest: r.sentRequest,
    relaySentDocUnavailable: r.relaySentDocUnavailable,
    ms: r.ms,
  })
}

async function later() {
  if (!isValidAutomergeUrl(laterUrl)) return fail(`not a valid automerge URL: ${laterUrl}`)
  const c = await connectClient(wsUrl, "client")
  const r = await findExpectingUnavailable(c, laterUrl)
  if (r.found)
    return fail("the document was already available; it must not exist on the relay before this script reports it unavailable")
  if (r.state !== "unavailable") return fail(`repo.find failed but handle state is ${r.state}: ${r.message}`)
  if (!r.relaySentDocUnavailable)
    return fail("reported unavailable, but the relay never sent doc-unavailable (connection lost?)")
  process.stderr.write(
    "interop-event " + JSON.stringify({ event: "unavailable", url: laterUrl, ms: r.ms }) + "\n"
  )
  log(`reported unavailable after ${r.ms} ms (${r.message}); waiting for it to arrive`)

  const handle = r.handle
  const t0 = elapsed()
  await until("the document to arrive later (handle unavailable -> ready)", () => handle.isReady(), {
    events: [[handle, "change"]],
  })
  // Does the same handle show up through the normal API now?
  const again = await c.repo.find(laterUrl)
  succeed({
    arrivedLater: true,
    url: laterUrl,
    doc: docJson(again),
    unavailableAfterMs: r.ms,
    arrivedAfterMs: elapsed() - t0,
    relaySentDocUnavailable: r.relaySentDocUnavailable,
  })
}

;(mode === "later" ? later() : plain()).catch(e => fail(errText(e)))
