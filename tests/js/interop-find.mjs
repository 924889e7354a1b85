// A fresh client fetches a document through the relay and checks its content.
//
//   node interop-find.mjs <wsUrl> <automergeUrl> [expectedJsonFile]
//
// With expectedJsonFile: the document (as JSON) must deep-equal the file's
// JSON (object key order ignored, array order significant). The content is
// compared as soon as repo.find resolves; if it differs, the script keeps
// watching for INTEROP_MATCH_GRACE_MS (default 2000) in case the rest of the
// history is still arriving, then fails with expected/actual.
// Without it: prints {"ok":true,"doc":...}.

import fs from "node:fs"
import {
  setup, succeed, fail, usage, errText, waiting, until, envInt, elapsed,
  connectClient, docJson, deepEqual,
} from "./interop-lib.mjs"
import { isValidAutomergeUrl } from "@automerge/automerge-repo"

setup("interop-find")

const [wsUrl, url, expectedFile] = process.argv.slice(2)
if (!wsUrl || !url) usage("node interop-find.mjs <wsUrl> <automergeUrl> [expectedJsonFile]")

async function main() {
  if (!isValidAutomergeUrl(url)) return fail(`not a valid automerge URL: ${url}`)
  let expected
  if (expectedFile !== undefined) {
    try {
      expected = JSON.parse(fs.readFileSync(expectedFile, "utf8"))
    } catch (e) {
      return fail(`cannot read expected JSON from ${expectedFile}: ${errText(e)}`)
    }
  }

  const c = await connectClient(wsUrl, "finder")
  waiting(`repo.find(${url}) through the relay`)
  const t0 = elapsed()
  let handle
  try {
    handle = await c.repo.find(url)
  } catch (e) {
    const said = c.adapter.received.some(m => m.type === "doc-unavailable")
    return fail(`repo.find failed: ${errText(e)}`, { relaySentDocUnavailable: said })
  }
  const findMs = elapsed() - t0

  if (expected === undefined) return succeed({ url, doc: docJson(handle), findMs })

  const grace = envInt("INTEROP_MATCH_GRACE_MS", 2000)
  const matched = await until(
    "document content to equal the expected JSON",
    () => deepEqual(docJson(handle), expected),
    { events: [[handle, "change"]], limitMs: grace }
  )
  if (!matched)
    return fail("document content differs from the expected JSON", {
      expected,
      actual: docJson(handle),
    })
  succeed({ url, doc: docJson(handle), findMs })
}

main().catch(e => fail(errText(e)))
