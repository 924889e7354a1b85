// The automerge-repo reference sync server, for comparing Converge against.
//
//   node reference-server.mjs <port> <dataDir>
//
// A Repo with the official WebSocketServerAdapter on a `ws` server bound to
// 127.0.0.1:<port> (0 = any free port) and NodeFSStorageAdapter(<dataDir>).
// Like the official automerge-repo-sync-server it never announces documents
// (sharePolicy -> false) but serves any document a peer asks for.
//
// stdout: {"ready":true,"port":N,"peerId":...} once it accepts connections.
// Runs until SIGTERM/SIGINT, then saves, closes and exits 0.

import os from "node:os"
import fs from "node:fs"
import { WebSocketServer } from "ws"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const [portArg, dataDir] = process.argv.slice(2)
const port = Number(portArg)
if (portArg === undefined || !Number.isInteger(port) || port < 0 || port > 65535 || !dataDir) {
  process.stderr.write("usage: node reference-server.mjs <port> <dataDir>\n")
  process.exit(1)
}

fs.mkdirSync(dataDir, { recursive: true })

const die = (what, err) => {
  process.stderr.write(`reference-server: ${what}: ${err?.stack || err}\n`)
  process.exit(1)
}
process.on("uncaughtException", err => die("uncaught exception", err))
process.on("unhandledRejection", err => die("unhandled rejection", err))

const wss = new WebSocketServer({ host: "127.0.0.1", port })
wss.on("error", err => die("websocket server error", err))

const repo = new Repo({
  network: [new WebSocketServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dataDir),
  peerId: `storage-server-${os.hostname()}`,
  sharePolicy: async () => false,
})

// The Repo hooks its adapter up to the server asynchronously; until then
// nothing answers a connection and the socket is dropped. Ready means both
// listening and hooked up.
const announce = () => {
  if (wss.listenerCount("connection") === 0) {
    setTimeout(announce, 5)
    return
  }
  const actual = wss.address().port
  process.stdout.write(JSON.stringify({ ready: true, port: actual, peerId: repo.peerId }) + "\n")
}
wss.on("listening", announce)

let stopping = false
async function stop(signal) {
  if (stopping) return
  stopping = true
  process.stderr.write(`reference-server: ${signal}, shutting down\n`)
  // Hard stop if something hangs.
  setTimeout(() => process.exit(0), 3000).unref()
  try {
    // Repo.flush() calls handle.doc() on every cached handle and throws for
    // handles that are not ready (e.g. documents someone asked for that were
    // unavailable), so only flush the ready ones.
    const ready = Object.values(repo.handles)
      .filter(h => h.isReady())
      .map(h => h.documentId)
    await repo.flush(ready)
  } catch (err) {
    process.stderr.write(`reference-server: flush failed: ${err?.message || err}\n`)
  }
  try {
    repo.networkSubsystem.adapters.forEach(a => a.disconnect())
  } catch {
    // ignore
  }
  wss.close(() => process.exit(0))
}
process.on("SIGTERM", () => void stop("SIGTERM"))
process.on("SIGINT", () => void stop("SIGINT"))
