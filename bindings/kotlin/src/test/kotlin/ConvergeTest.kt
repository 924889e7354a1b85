// Converge from Kotlin, through the uniffi-generated bindings, a real
// libconverge_ffi.so and real converge-server relays. The scenarios follow
// bindings/python/tests/test_converge.py.
//
// Needs (passed by the pom from -Dconverge.lib.dir / -Dconverge.server.bin):
//   -Djna.library.path=<dir with libconverge_ffi.so>
//   CONVERGE_SERVER_BIN=<path to converge-server>

import com.fasterxml.jackson.databind.JsonNode
import com.fasterxml.jackson.databind.ObjectMapper
import com.fasterxml.jackson.databind.node.NumericNode
import java.io.File
import java.nio.file.Files
import java.nio.file.Path
import java.util.concurrent.CompletableFuture
import java.util.concurrent.ConcurrentHashMap
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.ExecutionException
import java.util.concurrent.TimeUnit
import java.util.concurrent.TimeoutException
import kotlin.concurrent.thread
import kotlin.test.assertContains
import kotlin.test.assertEquals
import kotlin.test.assertFailsWith
import kotlin.test.assertFalse
import kotlin.test.assertNotEquals
import kotlin.test.assertNotNull
import kotlin.test.assertNull
import kotlin.test.assertTrue
import kotlin.test.fail
import kotlinx.coroutines.delay
import kotlinx.coroutines.runBlocking
import org.junit.jupiter.api.AfterEach
import org.junit.jupiter.api.BeforeAll
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.Timeout
import uniffi.converge_ffi.ContextListener
import uniffi.converge_ffi.ContextOp
import uniffi.converge_ffi.ConvergeException
import uniffi.converge_ffi.PresenceListener
import uniffi.converge_ffi.Repo
import uniffi.converge_ffi.TokenProvider
import uniffi.converge_ffi.Context as ConvergeContext

/** A converge-server on a free port with a fresh data dir. */
class Relay(binary: String, vararg extra: String) : AutoCloseable {
    private val dataDir: Path = Files.createTempDirectory("converge-kt-relay-")
    private val process: Process =
        ProcessBuilder(binary, "--listen", "127.0.0.1:0", "--data-dir", dataDir.toString(), *extra)
            .redirectErrorStream(true)
            .start()
    private val log = ArrayDeque<String>()

    /** The `ws://127.0.0.1:PORT` address the relay reported. */
    val url: String

    init {
        val reported = CompletableFuture<String>()
        // Keep draining its output so it never blocks on a full pipe; keep
        // the last lines for error messages.
        thread(isDaemon = true, name = "relay-output") {
            try {
                process.inputStream.bufferedReader().forEachLine { line ->
                    synchronized(log) {
                        log.addLast(line)
                        if (log.size > 200) log.removeFirst()
                    }
                    if (!reported.isDone) {
                        URL_PATTERN.find(line)?.let { reported.complete(it.value) }
                    }
                }
            } catch (_: java.io.IOException) {
                // The process was destroyed.
            }
            reported.completeExceptionally(IllegalStateException("the relay's output ended"))
        }
        url = try {
            reported.get(30, TimeUnit.SECONDS)
        } catch (e: Exception) {
            val cause = if (e is ExecutionException) e.cause else e
            val exit = if (process.isAlive) "still running" else "exit code ${process.exitValue()}"
            close()
            throw AssertionError(
                "the relay ($binary) did not report a ws:// address ($exit; $cause); " +
                    "its output:\n${logTail()}",
            )
        }
    }

    fun logTail(): String = synchronized(log) { log.joinToString("\n") }

    override fun close() {
        process.destroy()
        if (!process.waitFor(10, TimeUnit.SECONDS)) {
            process.destroyForcibly()
            process.waitFor(10, TimeUnit.SECONDS)
        }
        dataDir.toFile().deleteRecursively()
    }

    companion object {
        private val URL_PATTERN = Regex("""ws://[0-9.]+:[0-9]+""")
    }
}

@Timeout(value = 120, unit = TimeUnit.SECONDS, threadMode = Timeout.ThreadMode.SEPARATE_THREAD)
class ConvergeTest {
    private val mapper = ObjectMapper()

    /** Everything a test opened, closed in reverse order after it. */
    private val resources = ArrayDeque<AutoCloseable>()
    private val tempDirs = mutableListOf<File>()
    private var relay: Relay? = null

    companion object {
        private const val LIB = "libconverge_ffi.so"

        @JvmStatic
        @BeforeAll
        fun checkSetup() {
            val libDir = System.getProperty("jna.library.path")
                ?: fail("jna.library.path is not set: run mvn with -Dconverge.lib.dir=<dir with $LIB>")
            assertTrue(
                File(libDir, LIB).isFile,
                "$LIB not found in $libDir: build it (make bindings) and pass -Dconverge.lib.dir=<its dir>",
            )
            val server = System.getenv("CONVERGE_SERVER_BIN")
                ?: fail("CONVERGE_SERVER_BIN is not set: run mvn with -Dconverge.server.bin=<converge-server>")
            assertTrue(
                File(server).canExecute(),
                "converge-server not found or not executable at $server: pass -Dconverge.server.bin=<path>",
            )
        }
    }

    @AfterEach
    fun tearDown() {
        val errors = mutableListOf<Throwable>()
        while (resources.isNotEmpty()) {
            try {
                resources.removeLast().close()
            } catch (e: Throwable) {
                errors += e
            }
        }
        relay?.close()
        relay = null
        tempDirs.forEach { it.deleteRecursively() }
        tempDirs.clear()
        errors.firstOrNull()?.let { throw AssertionError("closing the test's objects failed", it) }
    }

    // ------------------------------------------------------------ helpers

    private fun <T : AutoCloseable> T.closeAfter(): T = also { resources.addLast(it) }

    /** Starts this test's relay (once) and returns its ws:// URL. */
    private fun relayUrl(): String =
        (relay ?: Relay(System.getenv("CONVERGE_SERVER_BIN")).also { relay = it }).url

    private fun newRepo(): Repo = Repo.inMemory().closeAfter()

    private fun connectedRepo(): Repo = newRepo().also { it.connect(relayUrl()) }

    private fun tempDir(prefix: String): File =
        Files.createTempDirectory(prefix).toFile().also { tempDirs += it }

    private fun json(text: String): JsonNode = mapper.readTree(text)

    /** JSON equality that treats 1 and 1.0 as the same number. */
    private fun sameJson(a: JsonNode, b: JsonNode): Boolean =
        a.equals(
            Comparator { x: JsonNode, y: JsonNode ->
                if (x is NumericNode && y is NumericNode) {
                    x.decimalValue().compareTo(y.decimalValue())
                } else if (x == y) {
                    0
                } else {
                    1
                }
            },
            b,
        )

    private fun assertJson(expected: String, actual: String, message: String = "") {
        assertTrue(sameJson(json(expected), json(actual)), "$message expected JSON $expected but was $actual")
    }

    /**
     * Polls [probe] until [accept] holds for its result, for at most
     * [timeoutMs]; fails with the last value or error seen.
     */
    private fun <T> waitFor(
        what: String,
        timeoutMs: Long = 10_000,
        probe: () -> T,
        accept: (T) -> Boolean,
    ): T {
        val deadline = System.nanoTime() + timeoutMs * 1_000_000
        var last: Any? = "(nothing yet)"
        var lastError: Throwable? = null
        while (true) {
            try {
                val value = probe()
                if (accept(value)) return value
                last = value
                lastError = null
            } catch (e: Exception) {
                lastError = e
            }
            if (System.nanoTime() > deadline) {
                val seen = lastError?.let { "last error: $it" } ?: "last value: $last"
                val log = relay?.let { "\nrelay output:\n${it.logTail()}" } ?: ""
                throw AssertionError("timed out after $timeoutMs ms waiting for $what; $seen$log", lastError)
            }
            Thread.sleep(50)
        }
    }

    /** Waits until the JSON at [path] of [ctx] equals [expected]. */
    private fun waitForJson(what: String, ctx: ConvergeContext, path: String, expected: String) {
        waitFor(what, probe = { ctx.getJson(path) }) { sameJson(json(expected), json(it)) }
    }

    /** `find` until the relay has the context (it may not have it yet). */
    private fun find(repo: Repo, url: String, timeoutMs: Long = 10_000): ConvergeContext =
        runBlocking { findWhenAvailable(repo, url, timeoutMs) }.closeAfter()

    private suspend fun findWhenAvailable(repo: Repo, url: String, timeoutMs: Long): ConvergeContext {
        val deadline = System.nanoTime() + timeoutMs * 1_000_000
        while (true) {
            try {
                return repo.find(url)
            } catch (e: ConvergeException.NotFound) {
                if (System.nanoTime() > deadline) {
                    throw AssertionError("$url was still not found after $timeoutMs ms", e)
                }
                delay(100)
            }
        }
    }

    // -------------------------------------------------------------- tests

    /** A relay that checks tokens signed with a fresh secret, and `converge-server token`. */
    private fun secureRelay(): Pair<String, (List<String>) -> String> {
        val binary = System.getenv("CONVERGE_SERVER_BIN")
        val secret = File(tempDir("converge-kt-secret-"), "secret")
        secret.writeText(java.util.UUID.randomUUID().toString() + java.util.UUID.randomUUID().toString())
        val secured = Relay(binary, "--jwt-secret-file", secret.path).closeAfter()
        val mint = { args: List<String> ->
            val proc = ProcessBuilder(listOf(binary, "token", "--secret-file", secret.path) + args).start()
            val token = proc.inputStream.bufferedReader().readText().trim()
            assertEquals(0, proc.waitFor(), "converge-server token failed")
            token
        }
        return secured.url to mint
    }

    @Test
    fun aTokenProviderOpensARelayThatChecksTokens() {
        val (url, mint) = secureRelay()
        class Tokens(private val value: String) : TokenProvider {
            @Volatile var asked = 0
            override fun token(): String? {
                asked++
                return value
            }
        }
        val writer = Tokens(mint(listOf("--sub", "alice", "--create", "--write", "*")))
        val alice = newRepo().also { it.connectWithToken(url, writer) }
        val ctx = alice.create("""{"room": "blue"}""").closeAfter()
        val id = ctx.url().removePrefix("automerge:")
        val bob = newRepo().also { it.connectWithToken(url, Tokens(mint(listOf("--sub", "bob", "--read", id)))) }
        val theirs = find(bob, ctx.url())
        waitForJson("bob to read alice's context", theirs, "/room", "\"blue\"")
        assertTrue(writer.asked >= 1, "the provider was asked for a token")
    }

    @Test
    fun twoReposSyncAContextThroughTheRelay() {
        val alice = connectedRepo()
        val bob = connectedRepo()
        assertNotEquals(alice.peerId(), bob.peerId())

        val ctx = alice.create("""{"room": {"topic": "hello"}, "members": []}""").closeAfter()
        assertTrue(ctx.url().startsWith("automerge:"), "unexpected context URL ${ctx.url()}")
        val theirs = find(bob, ctx.url())
        assertEquals(ctx.url(), theirs.url())
        waitForJson("bob to see the topic", theirs, "/room/topic", "\"hello\"")

        theirs.insertJson("/members", 0uL, "\"bob\"")
        waitForJson("alice to see bob in the members", ctx, "/members", """["bob"]""")
    }

    @Test
    fun offlineEditsMergeOnReconnect() {
        val alice = connectedRepo()
        val bob = connectedRepo()
        val mine = alice.create("""{"a": 0, "b": 0}""").closeAfter()
        mine.setCounter("/visits", 0L)
        val theirs = find(bob, mine.url())
        waitFor("bob to have the counter", probe = { json(theirs.getJson("")) }) { it.has("visits") }

        alice.disconnect()
        bob.disconnect()
        mine.setJson("/a", "1")
        mine.increment("/visits", 2L)
        theirs.setJson("/b", "2")
        theirs.increment("/visits", 3L)
        // Each side sees only its own edits while offline.
        assertJson("""{"a": 1, "b": 0, "visits": 2}""", mine.getJson(""), "alice offline:")
        assertJson("""{"a": 0, "b": 2, "visits": 3}""", theirs.getJson(""), "bob offline:")

        alice.connect(relayUrl())
        bob.connect(relayUrl())
        val expected = """{"a": 1, "b": 2, "visits": 5}"""
        waitForJson("alice to merge", mine, "", expected)
        waitForJson("bob to merge", theirs, "", expected)
    }

    @Test
    fun subscriptionFiresForARemoteChange() {
        val alice = connectedRepo()
        val bob = connectedRepo()
        val mine = alice.create("""{"settings": {"theme": "light"}}""").closeAfter()
        val theirs = find(bob, mine.url())
        waitFor("bob to have the settings", probe = { json(theirs.getJson("")) }) { it.has("settings") }

        val seen = CopyOnWriteArrayList<Pair<String, JsonNode>>()
        val dark = CompletableFuture<Pair<String, JsonNode>>()
        val listener = object : ContextListener {
            override fun onChange(origin: String, patchesJson: String) {
                for (patch in json(patchesJson)) {
                    seen += origin to patch
                    val value = patch.path("value")
                    if (value.isTextual && value.textValue() == "dark") dark.complete(origin to patch)
                }
            }
            override fun onLagged(missed: ULong, heads: List<String>) {
                // Two changes cannot overflow the event channel.
                dark.completeExceptionally(AssertionError("lagged by $missed events"))
            }
        }
        val sub = theirs.subscribe("/settings", listener).closeAfter()
        mine.setJson("/settings/theme", "\"dark\"")

        val (origin, patch) = try {
            dark.get(10, TimeUnit.SECONDS)
        } catch (e: TimeoutException) {
            throw AssertionError("no patch with value \"dark\" arrived within 10 s; seen: $seen")
        }
        assertEquals("/settings/theme", patch.path("path").asText(), "patch: $patch")
        assertNotEquals("local", origin, "a remote change was reported as local: $patch")
        sub.cancel()
    }

    @Test
    fun presenceIsSeen() {
        val alice = connectedRepo()
        val bob = connectedRepo()
        val mine = alice.create("{}").closeAfter()
        val theirs = find(bob, mine.url())

        val updates = ConcurrentHashMap<String, JsonNode>()
        val leaves = CopyOnWriteArrayList<Pair<String, Boolean>>()
        val watcher = object : PresenceListener {
            override fun onUpdate(peerId: String, stateJson: String) {
                updates[peerId] = json(stateJson)
            }

            override fun onLeave(peerId: String, goodbye: Boolean) {
                leaves += peerId to goodbye
            }
        }
        val quiet = object : PresenceListener {
            override fun onUpdate(peerId: String, stateJson: String) {}

            override fun onLeave(peerId: String, goodbye: Boolean) {}
        }

        val watching = theirs.startPresence("""{"name": "bob"}""", 200uL, 1000uL, watcher).closeAfter()
        val me = mine.startPresence("""{"name": "alice"}""", 200uL, 1000uL, quiet).closeAfter()
        me.set("cursor", """{"line": 4}""")

        val aliceId = alice.peerId()
        waitFor("bob to see alice's cursor", probe = { updates[aliceId] }) {
            it != null && sameJson(json("""{"line": 4}"""), it.path("cursor"))
        }
        val peers = json(watching.peersJson())
        assertEquals("alice", peers.path(aliceId).path("name").asText(), "bob's view of present peers: $peers")

        me.stop()
        val left = waitFor("bob to see alice leave", timeoutMs = 5_000, probe = { leaves.toList() }) { seen ->
            seen.any { it.first == aliceId }
        }
        assertTrue(left.first { it.first == aliceId }.second, "alice left by timeout, not by goodbye: $left")
    }

    @Test
    fun badInputThrowsTheRightConvergeException() {
        val repo = newRepo()
        val ctx = repo.create(null).closeAfter()

        assertFailsWith<ConvergeException.InvalidInput> { ctx.getJson("no-leading-slash") }
        assertFailsWith<ConvergeException.NotFound> { ctx.getJson("/missing") }
        assertFailsWith<ConvergeException.InvalidInput> { ctx.setJson("/x", "{not json") }
        ctx.setJson("/n", "1")
        val mismatch = assertFailsWith<ConvergeException.TypeMismatch> { ctx.increment("/n", 1L) }
        assertFalse(mismatch.message.isNullOrBlank(), "a ConvergeException should say what went wrong")
        // A loopback address, so that a regression never reaches the network.
        assertFailsWith<ConvergeException.InvalidInput> { repo.connect("http://127.0.0.1:9/") }
        assertFailsWith<ConvergeException.InvalidInput> { repo.create("[1, 2") }
        assertFailsWith<ConvergeException.InvalidInput> { ctx.getJsonAt("", listOf("not-a-hash")) }
        assertFailsWith<ConvergeException.InvalidInput> { runBlocking { repo.find("not a url") } }

        // Every variant is a ConvergeException, so one catch handles them all.
        val any = assertFailsWith<ConvergeException> { ctx.getJson("/missing") }
        assertTrue(any is ConvergeException.NotFound, "got $any")

        // Storage that cannot be opened: a plain file where the directory should be.
        val file = File(tempDir("converge-kt-bad-"), "not-a-dir").apply { writeText("x") }
        assertFailsWith<ConvergeException.Storage> { Repo.open(file.path).close() }
    }

    @Test
    fun aTransactionIsAtomic() {
        val repo = newRepo()
        val ctx = repo.create("""{"title": "draft", "n": 1, "meta": {"x": 1}}""").closeAfter()
        val before = ctx.getJson("")
        val headsBefore = ctx.heads()

        // The last op fails (n is not a counter): nothing of it may stay.
        assertFailsWith<ConvergeException.TypeMismatch> {
            ctx.transact(
                listOf(
                    ContextOp.Set("/title", "\"final\""),
                    ContextOp.SetCounter("/count", 0L),
                    ContextOp.Delete("/meta"),
                    ContextOp.Increment("/n", 1L),
                ),
                "must not land",
            )
        }
        assertJson(before, ctx.getJson(""), "after the failed transaction:")
        assertEquals(headsBefore, ctx.heads(), "a failed transaction must not add a change")
        // A malformed op is refused before anything runs.
        assertFailsWith<ConvergeException.InvalidInput> {
            ctx.transact(listOf(ContextOp.Set("/title", "\"x\""), ContextOp.Set("/y", "{oops")), null)
        }
        assertJson(before, ctx.getJson(""), "after the malformed transaction:")

        // A good one lands as one change with its message.
        val hash = ctx.transact(
            listOf(
                ContextOp.Splice("/title", 0uL, 5uL, "final"),
                ContextOp.SetCounter("/count", 0L),
                ContextOp.Increment("/count", 5L),
                ContextOp.Set("/tags", "[]"),
                ContextOp.Insert("/tags", 0uL, "\"a\""),
                ContextOp.Insert("/tags", 1uL, "\"b\""),
                ContextOp.Remove("/tags", 0uL, 1uL),
                ContextOp.Delete("/n"),
                ContextOp.MergeJson("/meta", """{"x": null, "y": 2}"""),
            ),
            "publish",
        )
        assertNotNull(hash, "a transaction that changed something returns its hash")
        assertJson(
            """{"title": "final", "count": 5, "tags": ["b"], "meta": {"y": 2}}""",
            ctx.getJson(""),
            "after the good transaction:",
        )
        assertEquals(listOf(hash), ctx.heads(), "the transaction is the one new head")

        val history = ctx.history(0uL, 10uL)
        val newest = history.firstOrNull() ?: fail("empty history")
        assertEquals(hash, newest.hash, "history is newest first: $history")
        assertEquals("publish", newest.message, "newest change: $newest")
        assertNull(history.firstOrNull { it.message == "must not land" }, "history: $history")
        assertTrue(newest.time > 0L, "change time: $newest")

        // The old version is still readable at the old heads.
        assertJson(before, ctx.getJsonAt("", headsBefore), "at the old heads:")
        // Nothing to do, nothing committed.
        assertNull(ctx.transact(emptyList(), "empty"), "an empty transaction commits nothing")
    }

    @Test
    fun syncStatusDocumentsAndPersistence(): Unit = runBlocking {
        // waitSynced / syncStatus / listDocuments against a relay.
        val alice = connectedRepo()
        val ctx = alice.create("""{"v": 0}""").closeAfter()
        ctx.setJson("/v", "1")
        assertTrue(ctx.waitSynced(10_000uL), "waitSynced timed out; status: ${ctx.syncStatus()}")
        val status = ctx.syncStatus()
        assertTrue(status.saved, "status: $status")
        assertEquals(ctx.heads().sorted(), status.heads.sorted(), "status: $status")
        assertTrue(status.peers.isNotEmpty(), "no peer syncs the context: $status")
        assertTrue(status.peers.all { it.inSync }, "a peer is behind: $status")
        assertTrue(alice.connectedPeers().isNotEmpty(), "no connected peers")
        assertContains(alice.listDocuments(), ctx.url())

        // A lone repo has nobody to sync with.
        val lonely = newRepo()
        val alone = lonely.create("{}").closeAfter()
        assertFalse(alone.waitSynced(300uL), "a repo with no peer cannot be synced")

        // A RocksDB repo keeps a context across shutdown and reopen.
        val dir = tempDir("converge-kt-rocks-")
        val url = Repo.open(dir.path).use { stored ->
            val created = stored.create("""{"kept": true, "list": [1, 2]}""").use { it.url() }
            stored.shutdown()
            created
        }
        // RocksDB's lock goes when the runtime has dropped the storage,
        // which can lag close() a little: retry opening until a deadline.
        val reopened = waitFor("the RocksDB directory to be free to reopen", probe = {
            try {
                Repo.open(dir.path)
            } catch (e: ConvergeException.Storage) {
                null
            }
        }) { it != null }!!.closeAfter()
        assertContains(reopened.listDocuments(), url)
        val back = reopened.find(url).closeAfter()
        assertJson("""{"kept": true, "list": [1, 2]}""", back.getJson(""), "after reopening:")
    }
}
