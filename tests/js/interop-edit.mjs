// Edit a document through the relay and wait for someone else's edit.
//
//   node interop-edit.mjs <wsUrl> <automergeUrl> <key> <value> <waitKey> <waitValue>
//
// Finds the document, sets doc[key] = value (a string), then waits until
// doc[waitKey] === waitValue (set by another client, e.g. the Rust one).
// waitKey "-" means do not wait. In both cases it finally waits until the
// relay holds our change (remote heads for the relay's storageId, or a
// fresh client that sees it), so exiting never loses the edit.
// Prints {"ok":true,"doc":...}.

import {
  setup, succeed, fail, usage, errText, waiting, until, elapsed,
  connectClient, docJson, waitUntilRelayHas,
} from "./interop-lib.mjs"
import { isValidAutomergeUrl } from "@automerge/automerge-repo"

setup("interop-edit")

const args = process.argv.slice(2)
const [wsUrl, url, key, value, waitKey, waitValue] = args
if (args.length < 5 || (waitKey !== "-" && waitValue === undefined))
  usage("node interop-edit.mjs <wsUrl> <automergeUrl> <key> <value> <waitKey|-> [waitValue]")

async function main() {
  if (!isValidAutomergeUrl(url)) return fail(`not a valid automerge URL: ${url}`)
  const c = await connectClient(wsUrl, "editor")
  waiting(`repo.find(${url}) through the relay`)
  let handle
  try {
    handle = await c.repo.find(url)
  } catch (e) {
    return fail(`repo.find failed: ${errText(e)}`)
  }

  handle.change(d => {
    d[key] = value
  })
  const t0 = elapsed()

  let waitedMs
  if (waitKey !== "-") {
    await until(`doc[${JSON.stringify(waitKey)}] === ${JSON.stringify(waitValue)}`,
      // String() so a scalar string written by Rust (an ImmutableString in
      // automerge 3 JS) compares equal to a collaborative text string.
      () => handle.doc()[waitKey] !== undefined && String(handle.doc()[waitKey]) === waitValue,
      { events: [[handle, "change"]] })
    waitedMs = elapsed() - t0
  }

  const ack = await waitUntilRelayHas(c, handle, wsUrl)
  succeed({ url, doc: docJson(handle), waitedMs, relayAck: ack.via, relayAckMs: elapsed() - t0 })
}

main().catch(e => fail(errText(e)))
