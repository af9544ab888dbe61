// The browser's stream client (meshxl/streams/static/meshxl-streams.js) under Node's own
// test runner, with no dependency: its frames, its Server-Sent Events reader, and its
// stream logic (resume, resend, duplicates, order, acknowledgements, refusals, limits)
// over an in-memory connection a test drives frame by frame. No socket.
//
// Run by tests/integration/test_streams_browser.py, which hands it what the Python side
// says (MESHXL_STREAMS_FIXTURE: the protocol's constants and frames the Python encoder
// wrote) and reads back what this side writes (MESHXL_STREAMS_OUT), so the two ends
// cannot drift apart. By hand: node --test tests/js/ (the cross-checks then skip).

import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { test } from "node:test";

import {
  ACK, ClientStream, DEFAULTS, END, EPOCH_HEADER, ERROR, MESSAGE, OPEN, ProtocolError, READY,
  REFUSALS, RESUME, SseParser, StreamEnded, StreamLost, StreamRefused, SUBPROTOCOL,
  backoffPause, decodeBinary, decodeFrame, encodeBinary, encodeFrame, encodedSize,
  eventStreamConnector, refusalOfClose, sseFrame, validToken,
} from "../../meshxl/streams/static/meshxl-streams.js";

const fixturePath = process.env.MESHXL_STREAMS_FIXTURE;
const fixture = fixturePath ? JSON.parse(readFileSync(fixturePath, "utf8")) : null;
const crossCheck = { skip: fixture === null && "run through pytest (it writes the fixture)" };
const TOKEN = "AAAAAAAAAAAAAAAAAAAAAA";
const OTHER = "BBBBBBBBBBBBBBBBBBBBBQ";

const hex = (bytes) => Buffer.from(bytes).toString("hex");
// The suite's time scale (tests/harness/clock.py), passed in by its runner.
const SCALE = Number(process.env.MESHXL_STREAMS_TIME_SCALE || "1");
/** Let ms (scaled) pass on purpose: for what must not happen meanwhile. */
const window = (ms) => new Promise((resolve) => setTimeout(resolve, ms * SCALE));
const unhex = (text) => new Uint8Array(Buffer.from(text, "hex"));

/** Until `condition()` is truthy (its value), polling; fails after `ms`. */
async function until(condition, what, ms = 5000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

// -- the protocol, as the Python side says it ------------------------------------------

test("the constants are the Python protocol's", crossCheck, () => {
  assert.equal(SUBPROTOCOL, fixture.subprotocol);
  assert.deepEqual(REFUSALS.map((r) => [r.name, r.closeCode, r.httpStatus, r.retry, r.meaning]),
    fixture.refusals.map((r) => [r.name, r.close_code, r.http_status, r.retry, r.meaning]));
  const limits = fixture.limits;
  assert.deepEqual([DEFAULTS.maxUnackedBytes, DEFAULTS.maxMessageBytes, DEFAULTS.ackDelayMs,
    DEFAULTS.ackEvery], [limits.max_unacked_bytes, limits.max_message_bytes,
    limits.ack_delay * 1000, limits.ack_every]);
  assert.equal(DEFAULTS.resumeTimeoutMs, fixture.client.resume_timeout * 1000);
  assert.deepEqual(DEFAULTS.backoffMs, fixture.client.backoff.map((s) => s * 1000));
});

test("frames the Python side writes decode to the same fields", crossCheck, () => {
  for (const { text, frame } of fixture.frames) {
    const decoded = decodeFrame(text);
    assert.equal(decoded.type, frame.type, text);
    for (const [field, value] of Object.entries(frame)) {
      if (value === null) continue;
      if (field === "refusal") assert.equal(decoded.refusal.name, value, text);
      else assert.deepEqual(decoded[field], value, text);
    }
  }
  for (const [seq, frame, payload] of fixture.binary) {
    const [got, bytes] = decodeBinary(unhex(frame).buffer);
    assert.equal(got, seq);
    assert.equal(hex(bytes), payload);
  }
});

test("what the Python side refuses, this side refuses", crossCheck, () => {
  for (const text of fixture.malformed) assert.throws(() => decodeFrame(text), ProtocolError, text);
});

test("an event stream as the Python server writes it reads as its frames", crossCheck, () => {
  const parser = new SseParser();
  const frames = [];
  const text = fixture.sse.text;
  for (let i = 0; i < text.length; i += 7) { // in pieces, cut anywhere
    for (const event of parser.feed(text.slice(i, i + 7))) frames.push(sseFrame(event, fixture.sse.token));
  }
  assert.deepEqual(frames.map((f) => [f.type, f.seq ?? null]), fixture.sse.frames.map((f) => [f.type, f.seq]));
  assert.deepEqual(frames.filter((f) => f.type === MESSAGE).map((f) => (f.payload instanceof Uint8Array ? hex(f.payload) : f.payload)),
    fixture.sse.payloads);
  assert.equal(frames[0].token, fixture.sse.token);
  assert.equal(frames[0].epoch, fixture.sse.epoch);
  assert.equal(frames.at(-2).refusal.name, "failed"); // a handler that failed: error, then end
});

test("frames this side writes are written for the Python side to read", crossCheck, () => {
  const frames = [
    { type: OPEN }, { type: RESUME, token: TOKEN, recv: 0 }, { type: RESUME, token: OTHER, recv: 2 ** 53 - 1 },
    { type: MESSAGE, seq: 1, payload: { text: "h\u00e9\u4e16 \ud83d\ude00", n: [1, 2.5, -3e-7, null, true] } },
    { type: MESSAGE, seq: 2 ** 40, payload: "only a string" }, { type: MESSAGE, seq: 3, payload: [1], ack: 2 },
    { type: ACK, seq: 0 }, { type: END, seq: 7 },
  ];
  const binary = [[1, new Uint8Array([0, 1, 255])], [2 ** 53 - 1, new Uint8Array(0)],
    [2 ** 33 + 5, new Uint8Array([42])]];
  const out = { frames: frames.map((f) => encodeFrame(f)),
    binary: binary.map(([seq, bytes]) => [seq, hex(encodeBinary(seq, bytes)), hex(bytes)]),
    sizes: [{ a: "\u00e9" }, [1, "x"], "\ud83d\ude00"].map((v) => [v, encodedSize(v)]) };
  writeFileSync(process.env.MESHXL_STREAMS_OUT, JSON.stringify(out));
});

// -- frames -----------------------------------------------------------------------------

test("tokens are 22 characters of base64url for exactly 128 bits", () => {
  assert.ok(validToken(TOKEN) && validToken(OTHER) && validToken("-_-_-_-_-_-_-_-_-_-_-w"));
  for (const bad of ["", "A".repeat(21), "A".repeat(23), "AAAAAAAAAAAAAAAAAAAAAB", "AAAAAAAAAAAAAAAAAAAA+A", 42, null]) {
    assert.equal(validToken(bad), false, String(bad));
  }
});

test("malformed frames are protocol errors, never frames", () => {
  for (const text of ["", "[]", "null", '{"t":"x"}', '{"t":"m","s":1}', '{"t":"m","s":0,"d":1}',
    '{"t":"m","s":1.5,"d":1}', '{"t":"a","s":-1}', `{"t":"a","s":${2 ** 53}}`, '{"t":"ready","id":"x","in":0,"out":0}',
    '{"t":"error","code":"nope"}', '{"t":"resume","id":"AAAAAAAAAAAAAAAAAAAAAA","recv":"1"}', "{" + " ".repeat(1 << 20) + "}"]) {
    assert.throws(() => decodeFrame(text), ProtocolError, text.slice(0, 60));
  }
  assert.throws(() => decodeBinary(new ArrayBuffer(7)), ProtocolError);
  const beyond = new Uint8Array(9);
  beyond[1] = 0x20; // 2**53
  assert.throws(() => decodeBinary(beyond.buffer), ProtocolError);
  assert.throws(() => decodeBinary(new ArrayBuffer(8)), ProtocolError); // message 0
});

test("binary messages round trip with their number", () => {
  for (const seq of [1, 255, 2 ** 32, 2 ** 53 - 1]) {
    const [got, bytes] = decodeBinary(encodeBinary(seq, new Uint8Array([9, 8, 7])).buffer);
    assert.deepEqual([got, [...bytes]], [seq, [9, 8, 7]]);
  }
});

test("a refusal's close code names it", () => {
  assert.equal(refusalOfClose(4404).name, "unknown-stream");
  assert.equal(refusalOfClose(1006), null);
  assert.ok(REFUSALS.every((r) => r.closeCode >= 4000 && r.closeCode <= 4999));
});

// -- Server-Sent Events -------------------------------------------------------------------

test("the event reader takes any line ending, comments, multi-line data and a BOM", () => {
  const parser = new SseParser();
  const events = [
    ...parser.feed("\ufeffevent: ready\r\ndata: {\"a\":"),
    ...parser.feed("1}\r"),
    ...parser.feed("\n\r\n: ping\n\nid: T:1\ndata:x\ndata: y\r\rdata\n\nevent: ignored\n\n"),
  ];
  assert.deepEqual(events, [
    { event: "ready", data: "{\"a\":1}", id: null },
    { event: "message", data: "x\ny", id: "T:1" },
    { event: "message", data: "", id: null }, // a data line without a value is an event
  ]); // ...an event without data is none
});

test("events of another stream, or that the protocol does not know, are protocol errors", () => {
  assert.throws(() => sseFrame({ event: "message", data: "1", id: `${OTHER}:1` }, TOKEN), ProtocolError);
  assert.throws(() => sseFrame({ event: "message", data: "1", id: null }, TOKEN), ProtocolError);
  assert.throws(() => sseFrame({ event: "message", data: "{", id: `${TOKEN}:1` }, TOKEN), ProtocolError);
  assert.throws(() => sseFrame({ event: "surprise", data: "1", id: null }, TOKEN), ProtocolError);
  assert.throws(() => sseFrame({ event: "ack", data: "-1", id: null }, TOKEN), ProtocolError);
  assert.throws(() => sseFrame({ event: "binary", data: "%%%", id: `${TOKEN}:1` }, TOKEN), ProtocolError);
  assert.deepEqual(sseFrame({ event: "binary", data: "AAH/", id: `${TOKEN}:3` }, TOKEN),
    { type: MESSAGE, seq: 3, payload: new Uint8Array([0, 1, 255]) });
});

test("an event stream's POSTs name the epoch its ready said", async (t) => {
  // Each POST is routed on its own: named, one that reaches a former server of the
  // stream is refused there (moved) instead of taken and lost.
  const posts = [];
  const realFetch = globalThis.fetch;
  t.after(() => { globalThis.fetch = realFetch; });
  globalThis.fetch = async (url, init) => {
    if (init.method === "POST") {
      posts.push(new Headers(init.headers).get(EPOCH_HEADER));
      return new Response(null, { status: 202 });
    }
    return new Response(`event: ready\ndata: {"id":"${TOKEN}","in":0,"out":0,"epoch":5}\n\n`,
      { status: 200, headers: { "Content-Type": "text/event-stream" } });
  };
  const conn = await eventStreamConnector("http://mesh.test/feed")(new AbortController().signal);
  await conn.hello({ type: OPEN });
  for await (const frame of conn.frames()) {
    assert.deepEqual(frame, { type: READY, token: TOKEN, consumed: 0, last: 0, epoch: 5 });
    break;
  }
  await conn.sendMessage(1, { n: 1 });
  await conn.sendAck(1);
  await conn.sendEnd(1);
  assert.deepEqual(posts, ["5", "5", "5"]);
  conn.close();
});

// -- the stream, over connections a test drives -------------------------------------------

/** A connection the test drives: it pushes the server's frames and reads what the
 * stream said (its hello, messages, acknowledgements, end). */
class Scripted {
  constructor() {
    this.said = null;
    this.log = [];
    this.sent = 0;
    this.closeCode = null;
    this.closeReason = "";
    this.closed = false;
    this._items = [];
    this._done = false;
    this._wake = null;
  }

  async hello(frame) { this.said = frame; }
  async sendMessage(seq, payload, text, ack = null) {
    this._say(["m", seq, payload]);
    if (ack !== null) this._say(["a", ack, "carried"]);
  }
  async sendAck(seq) { this._say(["a", seq]); }
  async sendEnd(last) { this._say(["end", last]); }

  _say(entry) {
    if (this.closed) throw new Error("the connection is closed");
    this.log.push(entry);
  }

  push(frame) { this._items.push(frame); this._wake?.(); }

  /** The server closes the connection (with a close code: a refusal, or none). */
  drop(code = null) { this.closeCode = code; this._done = true; this._wake?.(); }

  close() { this.closed = true; this._done = true; this._wake?.(); }

  async *frames() {
    for (;;) {
      if (this._items.length) yield this._items.shift();
      else if (this._done) return;
      else await new Promise((resolve) => { this._wake = resolve; });
    }
  }

  messages() { return this.log.filter((e) => e[0] === "m").map((e) => [e[1], e[2]]); }
  acks() { return this.log.filter((e) => e[0] === "a").map((e) => e[1]); }
}

function scripted(options = {}) {
  const conns = [];
  let refuseFrom = Infinity;
  const stream = new ClientStream(async () => {
    if (conns.length >= refuseFrom) throw new Error("connection refused");
    const conn = new Scripted();
    conns.push(conn);
    return conn;
  }, { backoffMs: [1, 5], ...options });
  return { stream, conns, refuseFrom: (n) => { refuseFrom = n; } };
}

async function opened(setup, { consumed = 0, last = 0 } = {}) {
  const starting = setup.stream.start();
  const conn = await until(() => setup.conns[0]?.said && setup.conns[0], "the first hello");
  assert.deepEqual(conn.said, { type: OPEN });
  conn.push({ type: READY, token: TOKEN, consumed, last });
  await starting;
  return conn;
}

test("each server message is delivered once, in order, across a resume that replays", async (t) => {
  const setup = scripted();
  t.after(() => setup.stream.disconnect());
  const first = await opened(setup);
  first.push({ type: MESSAGE, seq: 1, payload: "a" });
  first.push({ type: MESSAGE, seq: 2, payload: { b: 2 } });
  await until(() => setup.stream.recv === 2, "two messages");
  first.drop(1006);
  const second = await until(() => setup.conns[1]?.said && setup.conns[1], "the resume");
  assert.deepEqual(second.said, { type: RESUME, token: TOKEN, recv: 2 });
  second.push({ type: READY, token: TOKEN, consumed: 0, last: 3 });
  second.push({ type: MESSAGE, seq: 2, payload: { b: 2 } }); // already received: dropped
  second.push({ type: MESSAGE, seq: 3, payload: [3] });
  const got = [];
  for await (const message of setup.stream) {
    got.push(message);
    if (got.length === 3) break;
  }
  assert.deepEqual(got, ["a", { b: 2 }, [3]]);
  assert.equal(setup.stream.connections, 2);
  assert.equal(setup.stream.resumes.length, 1);
});

test("what the server did not consume is sent again, in order, on the next connection", async (t) => {
  const setup = scripted();
  t.after(() => setup.stream.disconnect());
  const resumed = [];
  setup.stream.addEventListener("resumed", (e) => resumed.push(e.detail));
  const first = await opened(setup);
  for (const value of ["x", "y", "z"]) await setup.stream.send(value);
  assert.deepEqual(first.messages(), [[1, "x"], [2, "y"], [3, "z"]]);
  first.push({ type: ACK, seq: 1 });
  await until(() => setup.stream.consumed === 1, "the server's consumption");
  first.drop(4000); // moved: resume
  const second = await until(() => setup.conns[1]?.said && setup.conns[1], "the resume");
  const queued = setup.stream.send("w"); // while resuming: waits for ready
  second.push({ type: READY, token: TOKEN, consumed: 2, last: 0 });
  await queued;
  await until(() => second.messages().length === 2, "the resent messages");
  assert.deepEqual(second.messages(), [[3, "z"], [4, "w"]]);
  assert.equal(resumed.length, 1);
  second.push({ type: ACK, seq: 4 });
  await setup.stream.flush();
  assert.equal(setup.stream.consumed, 4);
});

test("a resume reads the new connection while its resend waits on the transport", async (t) => {
  const setup = scripted();
  t.after(() => setup.stream.disconnect());
  const first = await opened(setup);
  for (const value of ["x", "y"]) await setup.stream.send(value);
  first.drop(1006);
  const second = await until(() => setup.conns[1]?.said && setup.conns[1], "the resume");
  let open;
  const gate = new Promise((resolve) => { open = resolve; });
  const send = second.sendMessage.bind(second);
  second.sendMessage = async (...args) => { await gate; return send(...args); };
  second.push({ type: READY, token: TOKEN, consumed: 0, last: 0 });
  second.push({ type: MESSAGE, seq: 1, payload: "r1" });
  const got = [];
  for await (const message of setup.stream) {
    got.push(message);
    break;
  }
  assert.deepEqual(got, ["r1"]); // read while the resend waits
  assert.deepEqual(second.messages(), []);
  open();
  await until(() => second.messages().length === 2, "the resent messages");
  assert.deepEqual(second.messages(), [[1, "x"], [2, "y"]]);
});

test("a gap in the server's messages fails the stream", async (t) => {
  const setup = scripted();
  t.after(() => setup.stream.disconnect());
  const first = await opened(setup);
  first.push({ type: MESSAGE, seq: 2, payload: 1 });
  await assert.rejects(setup.stream.receive(), ProtocolError);
  assert.equal(setup.stream.state, "failed");
});

test("acknowledgements wait ackDelayMs, and go at once after ackEvery messages", async (t) => {
  const lazy = scripted({ ackDelayMs: 60_000, ackEvery: 3 });
  t.after(() => lazy.stream.disconnect());
  const conn = await opened(lazy);
  conn.push({ type: MESSAGE, seq: 1, payload: 1 });
  conn.push({ type: MESSAGE, seq: 2, payload: 2 });
  await until(() => lazy.stream.recv === 2, "two messages");
  assert.deepEqual(conn.acks(), []);
  conn.push({ type: MESSAGE, seq: 3, payload: 3 });
  await until(() => conn.acks().length, "the acknowledgement of three");
  assert.deepEqual(conn.acks(), [3]);

  const prompt = scripted({ ackDelayMs: 5, ackEvery: 100 });
  t.after(() => prompt.stream.disconnect());
  const other = await opened(prompt);
  other.push({ type: MESSAGE, seq: 1, payload: 1 });
  await until(() => other.acks().length, "the delayed acknowledgement");
  assert.deepEqual(other.acks(), [1]);
});

test("an acknowledgement carried starts the wait for the next anew", async (t) => {
  const setup = scripted({ ackDelayMs: 300 * SCALE });
  t.after(() => setup.stream.disconnect());
  const conn = await opened(setup);
  conn.push({ type: MESSAGE, seq: 1, payload: "r1" });
  await until(() => setup.stream.recv === 1, "r1");
  await window(200); // r1 waits for a message to carry its acknowledgement
  await setup.stream.send("q1"); // carries 1
  conn.push({ type: MESSAGE, seq: 2, payload: "r2" });
  await until(() => setup.stream.recv === 2, "r2");
  await window(200); // 400 ms after r1, 200 after r2: r1's wait would have sent 2 alone
  await setup.stream.send("q2"); // carries 2
  await window(400); // no acknowledgement goes alone
  assert.deepEqual(conn.log, [["m", 1, "q1"], ["a", 1, "carried"], ["m", 2, "q2"],
    ["a", 2, "carried"]]);
});

test("an acknowledgement rides on the next message; the server's answer carries its own", async (t) => {
  const setup = scripted({ ackDelayMs: 60_000 });
  t.after(() => setup.stream.disconnect());
  const conn = await opened(setup);
  await setup.stream.send("q1");
  conn.push({ type: MESSAGE, seq: 1, payload: "r1", ack: 1 }); // the answer, and q1 consumed
  await until(() => setup.stream.recv === 1, "the answer");
  await until(() => setup.stream.consumed === 1, "q1 consumed");
  await setup.stream.send("q2");
  assert.deepEqual(conn.log, [["m", 1, "q1"], ["m", 2, "q2"], ["a", 1, "carried"]]);
});

test("a refusal that cannot be retried fails the stream with its name", async (t) => {
  for (const [code, name] of [[4403, "forbidden"], [4404, "unknown-stream"], [4409, "too-far-behind"], [4400, "malformed"]]) {
    const setup = scripted();
    t.after(() => setup.stream.disconnect());
    const failed = [];
    setup.stream.addEventListener("failed", (e) => failed.push(e.detail.error));
    const first = await opened(setup);
    first.drop(code);
    const error = await setup.stream.receive().catch((e) => e);
    assert.ok(error instanceof StreamRefused, String(error));
    assert.equal(error.code, name);
    assert.equal(error.refusal.closeCode, code);
    assert.deepEqual(failed, [error]);
    assert.equal(setup.conns.length, 1); // never tried again
  }
});

test("a refusal of the first open rejects start()", async () => {
  const setup = scripted();
  const starting = setup.stream.start();
  const conn = await until(() => setup.conns[0]?.said && setup.conns[0], "the hello");
  conn.push({ type: ERROR, refusal: REFUSALS.find((r) => r.name === "too-many-streams"), message: "16 open" });
  conn.drop(4429);
  await assert.rejects(starting, (e) => e instanceof StreamRefused && e.code === "too-many-streams" && /16 open/.test(e.message));
});

test("no connection for resumeTimeoutMs: StreamLost", async (t) => {
  const setup = scripted({ resumeTimeoutMs: 150 });
  t.after(() => setup.stream.disconnect());
  const first = await opened(setup);
  setup.refuseFrom(1);
  first.drop(1006);
  const started = Date.now();
  await assert.rejects(setup.stream.receive(), StreamLost);
  assert.ok(Date.now() - started >= 140, "gave up before resumeTimeoutMs");
});

test("send waits while maxUnackedBytes are not consumed", async (t) => {
  const setup = scripted({ maxUnackedBytes: 20, maxMessageBytes: 10 });
  t.after(() => setup.stream.disconnect());
  const conn = await opened(setup);
  await setup.stream.send("12345678"); // 10 bytes of JSON
  await setup.stream.send("abcdefgh");
  let third = false;
  const sending = setup.stream.send("ABCDEFGH").then(() => { third = true; });
  await until(() => conn.messages().length === 2, "two sent");
  assert.equal(third, false);
  conn.push({ type: ACK, seq: 1 });
  await sending;
  assert.deepEqual(conn.messages().map(([seq]) => seq), [1, 2, 3]);
  await assert.rejects(setup.stream.send("far too long a message"), ProtocolError);
});

test("only JSON values and bytes are messages; bytes are copied when sent", async (t) => {
  const setup = scripted();
  t.after(() => setup.stream.disconnect());
  const conn = await opened(setup);
  for (const bad of [undefined, NaN, Infinity, [1, -Infinity], 10n, () => 1]) {
    await assert.rejects(setup.stream.send(bad), ProtocolError, String(bad));
  }
  const bytes = new Uint8Array([1, 2, 3]);
  await setup.stream.send(bytes.subarray(1));
  bytes[1] = 99;
  assert.deepEqual([...conn.messages()[0][1]], [2, 3]);
  assert.equal(conn.messages()[0][0], 1); // the refused ones took no number
});

test("the server's end ends the iteration; a handler that failed raises after its messages", async (t) => {
  const setup = scripted();
  t.after(() => setup.stream.disconnect());
  const conn = await opened(setup);
  conn.push({ type: MESSAGE, seq: 1, payload: "last" });
  conn.push({ type: END, seq: 1 });
  const got = [];
  for await (const message of setup.stream) got.push(message);
  assert.deepEqual(got, ["last"]);
  assert.equal(setup.stream.state, "ended");
  assert.deepEqual(conn.acks(), [1]);
  await assert.rejects(setup.stream.receive(), StreamEnded);

  const failing = scripted();
  t.after(() => failing.stream.disconnect());
  const other = await opened(failing);
  other.push({ type: MESSAGE, seq: 1, payload: "partial" });
  other.push({ type: ERROR, refusal: REFUSALS.find((r) => r.name === "failed"), message: null });
  other.push({ type: END, seq: 1 });
  assert.equal(await failing.stream.receive(), "partial");
  await assert.rejects(failing.stream.receive(), (e) => e instanceof StreamRefused && e.code === "failed");
});

test("close() ends our side after our last message, on this connection or the next", async (t) => {
  const setup = scripted();
  t.after(() => setup.stream.disconnect());
  const first = await opened(setup);
  await setup.stream.send(1);
  first.drop(1001);
  const second = await until(() => setup.conns[1]?.said && setup.conns[1], "the resume");
  const closing = setup.stream.close();
  await assert.rejects(setup.stream.send(2), /sending side was closed/);
  second.push({ type: READY, token: TOKEN, consumed: 0, last: 0 });
  await closing;
  await until(() => second.log.some((e) => e[0] === "end"), "the end");
  assert.deepEqual(second.log.filter((e) => e[0] !== "a"), [["m", 1, 1], ["end", 1]]);
});

test("a server that resumes another stream, or claims more than was sent, fails it", async (t) => {
  const setup = scripted();
  t.after(() => setup.stream.disconnect());
  const first = await opened(setup);
  first.drop(1006);
  const second = await until(() => setup.conns[1]?.said && setup.conns[1], "the resume");
  second.push({ type: READY, token: OTHER, consumed: 0, last: 0 });
  await assert.rejects(setup.stream.receive(), /another stream/);

  const greedy = scripted();
  t.after(() => greedy.stream.disconnect());
  const conn = await opened(greedy);
  conn.push({ type: ACK, seq: 1 });
  await assert.rejects(greedy.stream.receive(), /consumed message 1 of 0/);
});

test("disconnect() ends the iteration and stops reconnecting", async () => {
  const setup = scripted();
  const conn = await opened(setup);
  const reading = (async () => { const got = []; for await (const m of setup.stream) got.push(m); return got; })();
  conn.push({ type: MESSAGE, seq: 1, payload: "only" });
  await until(() => setup.stream.recv === 1, "the message");
  setup.stream.disconnect();
  assert.deepEqual(await reading, ["only"]);
  assert.equal(setup.stream.state, "disconnected");
  assert.ok(conn.closed);
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(setup.conns.length, 1);
});

test("options are checked, with the name of what is wrong", () => {
  assert.throws(() => new ClientStream(async () => null, { resumeTimeout: 5 }), /unknown options: resumeTimeout/);
  assert.throws(() => new ClientStream(async () => null, { ackEvery: 0 }), /ackEvery must be a positive integer/);
  assert.throws(() => new ClientStream(async () => null, { ackDelayMs: NaN }), /ackDelayMs/);
  assert.throws(() => new ClientStream(async () => null, { maxMessageBytes: 10, maxUnackedBytes: 5 }), /at most maxUnackedBytes/);
});

test("the backoff doubles from its first pause up to its most, jittered", () => {
  assert.equal(backoffPause(0, [20, 1000], () => 0.99), 0);
  assert.equal(backoffPause(1, [20, 1000], () => 0.5), 20);
  assert.equal(backoffPause(3, [20, 1000], () => 0), 40);
  assert.equal(backoffPause(20, [20, 1000], () => 0.5), 1000);
});
