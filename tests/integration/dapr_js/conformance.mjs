// Dapr's JavaScript SDK (@dapr/dapr, DaprClient over HTTP) against meshxl's sidecar:
// the state-store conformance behaviours, observed and printed as one JSON line
// ("RESULT {...}") for tests/integration/test_dapr_js.py to assert on. The client is
// made as any Dapr application makes it: from DAPR_HOST and DAPR_HTTP_PORT.
import { DaprClient, StateConcurrencyEnum } from "@dapr/dapr";

const STORE = "statestore";
const client = new DaprClient();
const out = {};
const status = (result) => (result && result.error ? JSON.parse(result.error.message) : null);

await client.start();
out.metadata = await client.metadata.get();

// Values of every type the conformance suite uses.
const values = {
  string: "hello world", number: 42, float: 3.14, boolean: true, nothing: null,
  object: { a: [1, 2, { b: null }], c: "\u00e9" }, array: [1, "two", 3.5],
  unicode: "\u2603 snow",
};
await client.state.save(STORE, Object.entries(values).map(([key, value]) => ({ key: `v-${key}`, value })));
out.values = {};
for (const key of Object.keys(values)) out.values[key] = await client.state.get(STORE, `v-${key}`);
out.missing = await client.state.get(STORE, "never-written");

// Bulk get, in order, a missing key without data.
out.bulk = await client.state.getBulk(STORE, ["v-string", "v-number", "never-written"]);

// ETag: a wrong one fails save and delete; the right one passes.
await client.state.delete(STORE, "etag-key");
await client.state.save(STORE, [{ key: "etag-key", value: "one" }]);
const first = (await client.state.getBulk(STORE, ["etag-key"]))[0];
out.etagSaveWrong = status(await client.state.save(STORE, [{ key: "etag-key", value: "two", etag: "not-an-etag" }]));
out.etagSaveRight = status(await client.state.save(STORE, [{ key: "etag-key", value: "two", etag: first.etag }]));
const second = (await client.state.getBulk(STORE, ["etag-key"]))[0];
out.etagChanged = second.etag !== first.etag;
out.etagSaveStale = status(await client.state.save(STORE, [{ key: "etag-key", value: "three", etag: first.etag }]));
out.etagDeleteStale = status(await client.state.delete(STORE, "etag-key", { etag: first.etag }));
out.afterStale = await client.state.get(STORE, "etag-key");
out.etagDeleteRight = status(await client.state.delete(STORE, "etag-key", { etag: second.etag }));
out.afterDelete = await client.state.get(STORE, "etag-key");

// First-write: the second save without an ETag fails.
await client.state.delete(STORE, "fw");
const firstWrite = { concurrency: StateConcurrencyEnum.CONCURRENCY_FIRST_WRITE };
out.firstWriteOne = status(await client.state.save(STORE, [{ key: "fw", value: "one", options: firstWrite }]));
out.firstWriteTwo = status(await client.state.save(STORE, [{ key: "fw", value: "two", options: firstWrite }]));
out.firstWriteValue = await client.state.get(STORE, "fw");

// TTL: ttlExpireTime reported, a 2 s TTL gone within the suite's 3 s (polled, bounded).
const asked = Date.now();
await client.state.save(STORE, [{ key: "ttl-hour", value: "x", metadata: { ttlInSeconds: "3600" } }]);
out.ttlHour = (await client.state.getBulk(STORE, ["ttl-hour"]))[0];
out.ttlHourAsked = asked;
await client.state.save(STORE, [{ key: "ttl-2", value: "soon gone", metadata: { ttlInSeconds: "2" } }]);
const saved = Date.now();
out.ttlAtOnce = await client.state.get(STORE, "ttl-2");
out.ttlGoneAfterMs = null;
while (Date.now() - saved < 8000) {
  if ((await client.state.get(STORE, "ttl-2")) === "") { out.ttlGoneAfterMs = Date.now() - saved; break; }
  await new Promise((r) => setTimeout(r, 100));
}

// Transactions: upserts and deletes in one commit; several operations on one key in order.
await client.state.save(STORE, [{ key: "tx-old", value: "old" }]);
await client.state.transaction(STORE, [
  { operation: "upsert", request: { key: "tx-a", value: { a: 1 } } },
  { operation: "upsert", request: { key: "tx-b", value: "b" } },
  { operation: "delete", request: { key: "tx-old" } },
]);
out.tx = await client.state.getBulk(STORE, ["tx-a", "tx-b", "tx-old"]);
await client.state.transaction(STORE, [
  { operation: "upsert", request: { key: "tx-order", value: "value1" } },
  { operation: "delete", request: { key: "tx-order" } },
  { operation: "upsert", request: { key: "tx-order", value: "value2" } },
  { operation: "delete", request: { key: "tx-order" } },
  { operation: "upsert", request: { key: "tx-order", value: "value3" } },
]);
out.txOrder = await client.state.get(STORE, "tx-order");
try {
  await client.state.transaction(STORE, [
    { operation: "upsert", request: { key: "tx-c", value: "c" } },
    { operation: "upsert", request: { key: "tx-a", value: "a2", etag: "1" } },
  ]);
  out.txFailed = null;
} catch (e) { out.txFailed = JSON.parse(e.message); }
out.txNotApplied = await client.state.getBulk(STORE, ["tx-c", "tx-a"]);

// What meshxl does not serve: an unknown store, pub/sub, secrets: Dapr's errors at once.
try { await client.state.get("no-such-store", "k"); out.unknownStore = null; } catch (e) { out.unknownStore = JSON.parse(e.message); }
out.publish = status(await client.pubsub.publish("pubsub", "orders", { a: 1 }));
try { await client.secret.get("vault", "db"); out.secret = null; } catch (e) { out.secret = JSON.parse(e.message); }

await client.stop();
console.log("RESULT " + JSON.stringify(out));
