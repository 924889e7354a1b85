// Two independent automerge-repo clients exchange a document via the relay.
//
//   node interop-two-clients.mjs <wsUrl>
//
// A creates {text: "hello from A", n: 1}; B (its own Repo and websocket)
// finds it by URL through the relay and checks the content; B sets n = 2;
// A must observe n === 2. Prints {"ok":true,"url":...,"timings":{...}}.
//
// B asks for the document right after A created it, as a real app would, so
// this also checks that the relay does not answer "unavailable" while A's
// first sync round is still in flight.

import {
  setup, succeed, fail, usage, errText, waiting, until, elapsed,
  connectClient, docJson, deepEqual,
} from "./interop-lib.mjs"

setup("interop-two-clients")

const [wsUrl] = process.argv.slice(2)
if (!wsUrl) usage("node interop-two-clients.mjs <wsUrl>")

async function main() {
  const a = await connectClient(wsUrl, "A")
  const b = await connectClient(wsUrl, "B")

  const t0 = elapsed()
  const ha = a.repo.create({ text: "hello from A", n: 1 })
  const url = ha.url

  waiting(`B: repo.find(${url}) through the relay`)
  let hb
  try {
    hb = await b.repo.find(url)
  } catch (e) {
    const said = b.adapter.received.some(m => m.type === "doc-unavailable")
    return fail(`B could not find A's document: ${errText(e)}`, { url, relaySentDocUnavailable: said })
  }
  const findMs = elapsed() - t0

  const wanted = { text: "hello from A", n: 1 }
  await until("B to see A's initial content", () => deepEqual(docJson(hb), wanted), {
    events: [[hb, "change"]],
  })
  const bSeesMs = elapsed() - t0

  const t1 = elapsed()
  hb.change(d => {
    d.n = 2
  })
  await until("A to observe n === 2 (B's change)", () => ha.doc().n === 2, {
    events: [[ha, "change"]],
  })
  const backMs = elapsed() - t1

  const finalA = docJson(ha)
  if (!deepEqual(finalA, { text: "hello from A", n: 2 }))
    return fail("A's final document is not as expected", { actual: finalA })
  succeed({
    url,
    doc: finalA,
    peers: { a: a.repo.peerId, b: b.repo.peerId, relay: a.relayPeerId },
    timings: { bFindMs: findMs, bSeesContentMs: bSeesMs, changeBackToAMs: backMs },
  })
}

main().catch(e => fail(errText(e)))
