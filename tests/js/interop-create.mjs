// Create a document through the relay and make sure the relay holds it.
//
//   node interop-create.mjs <wsUrl> [automergeUrl]
//
// Creates {title: "survives restart", items: [1,2,3]}. With a second argument
// the document gets that exact id (via repo.import with docId; used to make a
// document appear "later" under an id some other client already asked for).
//
// Done when (1) the relay acknowledged our heads (remote heads reported for
// the relay's storageId, when it announces one) and (2) a second, fresh
// client found the document through the relay with the same content. Then
// waits INTEROP_SETTLE_MS (default 500 ms) more so the relay can write it to
// storage, and prints {"ok":true,"url":"automerge:...",...}.

import {
  setup, succeed, fail, usage, errText, waiting, until, sleep, log, envInt, elapsed,
  connectClient, docJson, deepEqual, handleHasHeads, waitUntilRelayHas, Automerge,
} from "./interop-lib.mjs"
import { isValidAutomergeUrl, parseAutomergeUrl } from "@automerge/automerge-repo"

setup("interop-create")

const [wsUrl, wantedUrl] = process.argv.slice(2)
if (!wsUrl) usage("node interop-create.mjs <wsUrl> [automergeUrl]")

const INITIAL = { title: "survives restart", items: [1, 2, 3] }

async function main() {
  if (wantedUrl !== undefined && !isValidAutomergeUrl(wantedUrl))
    return fail(`not a valid automerge URL: ${wantedUrl}`)

  const a = await connectClient(wsUrl, "creator")
  const tCreate = elapsed()
  let handle
  if (wantedUrl) {
    const { documentId } = parseAutomergeUrl(wantedUrl)
    handle = a.repo.import(Automerge.save(Automerge.from(INITIAL)), { docId: documentId })
  } else {
    handle = a.repo.create(INITIAL)
  }
  await until("created handle to be ready", () => handle.isReady())
  const url = handle.url
  log(`created ${url}`)

  const ack = await waitUntilRelayHas(a, handle, wsUrl)
  log(`relay acknowledged via ${ack.via} after ${ack.ms} ms`)

  // Independent confirmation: a brand-new client can fetch it.
  const b = await connectClient(wsUrl, "checker")
  waiting(`checker: repo.find(${url}) through the relay`)
  let found
  try {
    found = await b.repo.find(url)
  } catch (e) {
    return fail(`a second client could not find the new document: ${errText(e)}`)
  }
  const heads = handle.heads()
  await until("checker to hold every change of the creator", () => handleHasHeads(found, heads), {
    events: [[found, "change"]],
  })
  const got = docJson(found)
  if (!deepEqual(got, INITIAL))
    return fail("second client sees different content", { expected: INITIAL, actual: got })
  const syncedMs = elapsed() - tCreate

  const settle = envInt("INTEROP_SETTLE_MS", 500)
  waiting(`settle delay ${settle} ms`)
  await sleep(settle)
  succeed({
    url,
    documentId: handle.documentId,
    doc: docJson(handle),
    relayAck: ack.via,
    syncedMs,
  })
}

main().catch(e => fail(errText(e)))
