// A real automerge-repo client on a relay that checks tokens (the token is
// in the URL, as a browser would send it).
//
//   node interop-auth.mjs <wsUrlWithToken> read  <automergeUrl> <secret>
//   node interop-auth.mjs <wsUrlWithToken> write <automergeUrl> <secret> <key> <value>
//
// read:  finds the document; prints {"ok":true,"state":"ready"|"unavailable",
//        "doc":..., "sawSecret":bool} where sawSecret says whether <secret>
//        appears anywhere in the bytes the relay sent.
// write: finds it (it must be ready), sets doc[key] = value, and waits for
//        the relay's `error` message refusing it; prints {"ok":true,"errors":[...]}.

import {
  setup, succeed, fail, usage, errText, waiting, until, connectClient, docJson,
} from "./interop-lib.mjs"

setup("interop-auth")

const [wsUrl, mode, url, secret, key, value] = process.argv.slice(2)
if (!wsUrl || !mode || !url || !secret) usage("node interop-auth.mjs <wsUrl> read|write <automergeUrl> <secret> [key value]")

async function main() {
  const c = await connectClient(wsUrl, "auth-client")
  waiting(`repo.find(${url})`)
  let handle
  try {
    handle = await c.repo.find(url)
  } catch (e) {
    const unavailable = c.adapter.received.some(m => m.type === "doc-unavailable")
    if (mode === "read")
      return succeed({ state: unavailable ? "unavailable" : "error", error: errText(e), sawSecret: c.adapter.raw.includes(secret) })
    return fail(`repo.find failed: ${errText(e)}`)
  }
  if (mode === "read") {
    return succeed({ state: "ready", doc: docJson(handle), sawSecret: c.adapter.raw.includes(secret) })
  }
  if (mode !== "write" || key === undefined) return usage("write needs <key> <value>")
  handle.change(d => {
    d[key] = value
  })
  const refused = await until("the relay's error message refusing the change", () => c.adapter.errors.length > 0, {
    events: [[c.adapter, "message"]],
    limitMs: 10_000,
  })
  if (!refused) return fail("the relay did not refuse the change")
  succeed({ errors: c.adapter.errors })
}

main().catch(e => fail(errText(e)))
