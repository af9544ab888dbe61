// Dapr's JavaScript SDK through Envoy while the active member is killed (kill -9):
// saves key fo-<i> = i one after another, each either acknowledged (no error) or not,
// writing the count acknowledged to PROGRESS as it goes (the test kills the member once
// it is high enough); then reads every acknowledged key back through Envoy, now served
// by the new owner, and prints what it found as one JSON line ("RESULT {...}").
import { existsSync, writeFileSync } from "node:fs";
import { DaprClient } from "@dapr/dapr";

const STORE = "statestore";
const COUNT = Number(process.env.SAVES ?? "300");
const AFTER = Number(process.env.SAVES_AFTER_KILL ?? "60");
const DEADLINE = Date.now() + Number(process.env.DEADLINE_MS ?? "60000");
const client = new DaprClient();
await client.start();
const acked = [];
const failed = [];
let killedAt = null; // acknowledged saves when the test said it killed the member
for (let i = 0; i < COUNT && Date.now() < DEADLINE; i++) {
  const result = await client.state.save(STORE, [{ key: `fo-${i}`, value: { seq: i } }]);
  if (result && result.error) failed.push(i); else acked.push(i);
  writeFileSync(process.env.PROGRESS, String(acked.length));
  if (killedAt === null && existsSync(process.env.KILLED)) killedAt = acked.length;
  if (killedAt !== null && acked.length >= killedAt + AFTER) break;
}
const missing = [];
for (let start = 0; start < acked.length; start += 50) {
  const keys = acked.slice(start, start + 50).map((i) => `fo-${i}`);
  const items = await client.state.getBulk(STORE, keys);
  for (const [n, item] of items.entries()) {
    const i = acked[start + n];
    if (!item.data || item.data.seq !== i) missing.push([i, item.data ?? null]);
  }
}
await client.stop();
console.log("RESULT " + JSON.stringify({ acked: acked.length, failed: failed.length, killedAt, missing }));
