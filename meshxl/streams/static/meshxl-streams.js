// meshxl-streams.js: resumable streams for browsers (meshxl.resume.v1), over WebSocket
// and Server-Sent Events. One ES module, no build step, no dependencies; docs/streams.md,
// "Browser (JavaScript)".
//
//   import { openWebSocketStream } from "/meshxl-streams.js";
//   const stream = await openWebSocketStream("/chat");
//   await stream.send({ text: "hi" });
//   for await (const message of stream) { ... }      // each server message once, in order
//
// When a connection breaks (its member was killed, drained, cut off) the stream connects
// again, to wherever the mesh sends its session now, says what it received, sends again
// what the server had not consumed, and goes on: the application sees no error, no gap,
// no message twice. Only a stream that cannot go on fails: StreamRefused (unknown or
// expired, another session's, too far behind, malformed, the handler failed: the
// server's refusal) or StreamLost (no connection for resumeTimeoutMs). The protocol and
// the Python client this one matches: meshxl/streams/protocol.py and client.py.

export const SUBPROTOCOL = "meshxl.resume.v1";
export const STREAM_HEADER = "X-Meshxl-Stream";
export const RECV_HEADER = "X-Meshxl-Recv";
export const SEQ_HEADER = "X-Meshxl-Seq";
export const ACK_HEADER = "X-Meshxl-Ack";
export const END_HEADER = "X-Meshxl-End";
export const EPOCH_HEADER = "X-Meshxl-Epoch";

export const OPEN = "open", RESUME = "resume", READY = "ready", MESSAGE = "m", ACK = "a",
  END = "end", ERROR = "error";
const TYPES = new Set([OPEN, RESUME, READY, MESSAGE, ACK, END, ERROR]);
const MAX_SEQ = Number.MAX_SAFE_INTEGER; // 2**53 - 1, as the server allows
export const MAX_FRAME_BYTES = 1 << 20;

function refusal(name, closeCode, httpStatus, retry, meaning) {
  return Object.freeze({ name, closeCode, httpStatus, retry, meaning });
}

/** Why a stream cannot go on, as each transport says it (protocol.py's REFUSALS). The
 * client tries again on those with `retry`; the others fail the stream. */
export const REFUSALS = Object.freeze([
  refusal("moved", 4000, 421, true, "the stream goes on elsewhere (this member was " +
    "drained, or another took the stream over): resume it"),
  refusal("try-again", 4013, 503, true, "the stream cannot be committed here now (etcd or " +
    "the sidecar does not answer): resume it, here or elsewhere"),
  refusal("unknown-stream", 4404, 404, false, "no such stream: never opened, ended and " +
    "forgotten, or expired (its record lived the session TTL after its last message)"),
  refusal("forbidden", 4403, 403, false, "the stream belongs to another session"),
  refusal("too-far-behind", 4409, 409, false, "the client lags beyond what the stream " +
    "keeps: it did not acknowledge within the limits, or asks for messages already " +
    "acknowledged and dropped"),
  refusal("too-many-streams", 4429, 429, false, "the session has as many open streams as " +
    "its limit allows"),
  refusal("malformed", 4400, 400, false, "a frame that breaks the protocol: this stream " +
    "is closed, no other"),
  refusal("failed", 4500, 500, false, "the server's handler failed (an exception in the " +
    "application): the stream ended there, and a resume reports the same"),
]);
const BY_NAME = new Map(REFUSALS.map((r) => [r.name, r]));
const BY_CODE = new Map(REFUSALS.map((r) => [r.closeCode, r]));

export function refusalNamed(name) { return BY_NAME.get(name) ?? null; }
export function refusalOfClose(code) { return BY_CODE.get(code) ?? null; }

/** The client's defaults: the bounds and timings of protocol.py's Limits (in ms) and of
 * client.py's ClientStream. */
export const DEFAULTS = Object.freeze({
  maxUnackedBytes: 256 * 1024, // sent and not consumed by the server: beyond, send waits
  maxMessageBytes: 64 * 1024, // one message's encoded size at most
  ackDelayMs: 250, // at most this long between receiving a message and acknowledging it (a message sent first carries it)
  ackEvery: 32, // ...or at once after this many unacknowledged messages
  resumeTimeoutMs: 30_000, // no connection for this long: StreamLost
  backoffMs: [20, 1000], // pauses between attempts: 0, then first * 2**n up to the max
  connectTimeoutMs: 10_000, // one attempt, until the server's ready
  silenceMs: 6_000, // Server-Sent Events: no byte (not even a ping) for this long: broken
});

// -- errors ------------------------------------------------------------------------------

/** A frame that breaks the protocol (from the server, or a message that is not JSON). */
export class ProtocolError extends Error {
  constructor(message) { super(message); this.name = "ProtocolError"; }
}

/** The server refused the stream for good: `refusal` (one of REFUSALS) says why;
 * `code` is its name ("unknown-stream", "forbidden", "too-far-behind", ...). */
export class StreamRefused extends Error {
  constructor(refusal, message = "") {
    super(`${refusal.name}: ${message || refusal.meaning}`);
    this.name = "StreamRefused";
    this.refusal = refusal;
    this.code = refusal.name;
  }
}

/** No connection could carry the stream on for resumeTimeoutMs. */
export class StreamLost extends Error {
  constructor(message) { super(message); this.name = "StreamLost"; }
}

/** receive() after the server's handler finished and everything it sent was received. */
export class StreamEnded extends Error {
  constructor(message = "the server ended the stream") { super(message); this.name = "StreamEnded"; }
}

/** receive() or send() after this side called disconnect(). */
export class StreamDisconnected extends Error {
  constructor(message = "the stream was disconnected (disconnect())") {
    super(message); this.name = "StreamDisconnected";
  }
}

class ConnectionBroken extends Error {
  constructor(message) { super(message); this.name = "ConnectionBroken"; }
}

// -- frames (pure) -----------------------------------------------------------------------

function seqOf(value, field, zero = false) {
  const low = zero ? 0 : 1;
  if (!Number.isSafeInteger(value) || value < low || value > MAX_SEQ) {
    throw new ProtocolError(`${field} must be an integer from ${low} to ${MAX_SEQ}, ` +
      `not ${String(JSON.stringify(value)).slice(0, 40)}`);
  }
  return value;
}

/** A stream's id: 22 characters of base64url for 128 bits (the last one holds 2 bits). */
export function validToken(token) {
  return typeof token === "string" && /^[A-Za-z0-9_-]{21}[AQgw]$/.test(token);
}

function checkJson(key, value) {
  if (typeof value === "number" && !Number.isFinite(value)) {
    throw new ProtocolError(`a message must be JSON: ${value} is not`);
  }
  return value;
}

/** A JSON value's compact text (TypeError-free: ProtocolError for what is not JSON). */
export function jsonText(value) {
  let text;
  try {
    text = JSON.stringify(value, checkJson);
  } catch (error) {
    if (error instanceof ProtocolError) throw error;
    throw new ProtocolError(`a message must be JSON or bytes: ${error.message}`);
  }
  if (text === undefined) throw new ProtocolError(`a message must be JSON or bytes, not ${typeof value}`);
  return text;
}

export function isBinary(payload) {
  return payload instanceof ArrayBuffer || ArrayBuffer.isView(payload);
}

/** A binary payload's bytes, copied (the caller may reuse its buffer). */
export function bytesOf(payload) {
  if (payload instanceof ArrayBuffer) return new Uint8Array(payload.slice(0));
  return new Uint8Array(payload.buffer.slice(payload.byteOffset,
    payload.byteOffset + payload.byteLength));
}

const encoder = new TextEncoder();

/** A message's size as the limits count it: its bytes, or its compact JSON's. */
export function encodedSize(payload) {
  if (isBinary(payload)) return payload.byteLength;
  return encoder.encode(jsonText(payload)).length;
}

/** A frame from its JSON document; ProtocolError for anything the protocol does not say. */
export function frameOf(doc) {
  if (doc === null || typeof doc !== "object" || Array.isArray(doc) || !TYPES.has(doc.t)) {
    throw new ProtocolError(`a frame must be a JSON object whose t is one of ${[...TYPES].sort().join(", ")}`);
  }
  switch (doc.t) {
    case MESSAGE:
      if (!("d" in doc)) throw new ProtocolError("a message frame carries its payload in d");
      return { type: MESSAGE, seq: seqOf(doc.s, "s"), payload: doc.d,
        ack: "a" in doc ? seqOf(doc.a, "a", true) : null };
    case ACK: return { type: ACK, seq: seqOf(doc.s, "s", true) };
    case END: return { type: END, seq: seqOf(doc.s, "s", true) };
    case OPEN: return { type: OPEN };
    case RESUME:
      if (!validToken(doc.id)) throw new ProtocolError("resume needs the stream's id (22 characters of base64url)");
      return { type: RESUME, token: doc.id, recv: seqOf(doc.recv, "recv", true) };
    case READY:
      if (!validToken(doc.id)) throw new ProtocolError("ready carries the stream's id");
      return { type: READY, token: doc.id, consumed: seqOf(doc.in, "in", true),
        last: seqOf(doc.out, "out", true) };
    default: {
      const found = typeof doc.code === "string" ? refusalNamed(doc.code) : null;
      if (found === null) throw new ProtocolError(`an error frame with an unknown code ${String(doc.code).slice(0, 40)}`);
      return { type: ERROR, refusal: found,
        message: typeof doc.message === "string" ? doc.message.slice(0, 500) : null };
    }
  }
}

/** A WebSocket text frame's frame. */
export function decodeFrame(text) {
  if (text.length > MAX_FRAME_BYTES) throw new ProtocolError(`a frame of ${text.length} bytes (at most ${MAX_FRAME_BYTES})`);
  let doc;
  try {
    doc = JSON.parse(text);
  } catch (error) {
    throw new ProtocolError(`a text frame that is not JSON: ${error.message.slice(0, 80)}`);
  }
  return frameOf(doc);
}

/** A frame as a WebSocket text frame's JSON (a binary message: encodeBinary). A message
 * frame may carry its payload's JSON text already (`text`), and an acknowledgement
 * (`ack`, as an "a" frame's s). */
export function encodeFrame(frame) {
  switch (frame.type) {
    case MESSAGE:
      if (isBinary(frame.payload)) throw new TypeError("a binary message travels in a binary frame (encodeBinary)");
      return `{"t":"m","s":${seqOf(frame.seq, "seq")}${frame.ack == null ? "" : `,"a":${seqOf(frame.ack, "ack", true)}`},"d":${frame.text ?? jsonText(frame.payload)}}`;
    case ACK: case END: return JSON.stringify({ t: frame.type, s: seqOf(frame.seq, "seq", true) });
    case OPEN: return JSON.stringify({ t: OPEN });
    case RESUME: return JSON.stringify({ t: RESUME, id: frame.token, recv: seqOf(frame.recv, "recv", true) });
    case READY: return JSON.stringify({ t: READY, id: frame.token, in: frame.consumed, out: frame.last });
    case ERROR: return JSON.stringify({ t: ERROR, code: frame.refusal.name,
      message: frame.message || frame.refusal.meaning });
    default: throw new TypeError(`no frame of type ${frame.type}`);
  }
}

/** A binary message's frame: its number (8 bytes, big-endian), then its bytes. */
export function encodeBinary(seq, bytes) {
  seqOf(seq, "seq");
  const out = new Uint8Array(8 + bytes.byteLength);
  const view = new DataView(out.buffer);
  view.setUint32(0, Math.floor(seq / 2 ** 32));
  view.setUint32(4, seq % 2 ** 32);
  out.set(bytes instanceof Uint8Array ? bytes : bytesOf(bytes), 8);
  return out;
}

/** A binary frame's [seq, bytes] (the bytes a view of `buffer`, an ArrayBuffer). */
export function decodeBinary(buffer) {
  if (buffer.byteLength < 8) throw new ProtocolError("a binary frame starts with its message's number (8 bytes)");
  if (buffer.byteLength > MAX_FRAME_BYTES) throw new ProtocolError(`a frame of ${buffer.byteLength} bytes (at most ${MAX_FRAME_BYTES})`);
  const view = new DataView(buffer);
  const high = view.getUint32(0);
  if (high >= 2 ** 21) throw new ProtocolError("a binary frame's number is beyond 2**53 - 1");
  return [seqOf(high * 2 ** 32 + view.getUint32(4), "seq"), new Uint8Array(buffer, 8)];
}

// -- Server-Sent Events (pure) -----------------------------------------------------------

/** Reads an event stream as it arrives (the WHATWG rules: CRLF, LF or CR ends a line, a
 * blank line ends an event, ":" starts a comment): feed() text, get complete events
 * `{event, data, id}` (id null when the event named none). */
export class SseParser {
  constructor() { this._buffer = ""; this._reset(); this._first = true; }

  _reset() { this._event = "message"; this._data = []; this._id = null; }

  feed(text) {
    if (this._first && text.length) {
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      this._first = false;
    }
    this._buffer += text;
    const events = [];
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this._buffer);
      // A CR at the very end may be the first half of a CRLF: wait for what follows.
      if (match === null || (match[0] === "\r" && match.index === this._buffer.length - 1)) break;
      const line = this._buffer.slice(0, match.index);
      this._buffer = this._buffer.slice(match.index + match[0].length);
      if (line === "") {
        if (this._data.length) events.push({ event: this._event, data: this._data.join("\n"), id: this._id });
        this._reset();
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (name === "event") this._event = value;
      else if (name === "data") this._data.push(value);
      else if (name === "id" && !value.includes("\0")) this._id = value;
    }
    return events;
  }
}

function countOf(text, what) {
  if (!/^[0-9]{1,16}$/.test(text)) throw new ProtocolError(`${what} is a message number, not ${text.slice(0, 40)}`);
  return seqOf(Number(text), what, true);
}

function base64Bytes(text) {
  let raw;
  try {
    raw = atob(text);
  } catch {
    throw new ProtocolError("a binary event's data is not base64");
  }
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i += 1) out[i] = raw.charCodeAt(i);
  return out;
}

/** An event of a stream's event stream as a frame (sse.py's module docstring); `token`:
 * the stream's, which every message's id starts with. */
export function sseFrame({ event, data, id }, token) {
  try {
    switch (event) {
      case "ready": { // its epoch: the POSTs name it, so no former server takes them
        const doc = JSON.parse(data);
        const frame = frameOf({ ...doc, t: READY });
        return Number.isSafeInteger(doc?.epoch) && doc.epoch >= 0 ? { ...frame, epoch: doc.epoch } : frame;
      }
      case "message": case "binary": {
        const cut = (id ?? "").lastIndexOf(":");
        if (cut < 0 || (token !== null && id.slice(0, cut) !== token)) {
          throw new ProtocolError(`a message whose id ${String(id).slice(0, 40)} is not this stream's`);
        }
        return { type: MESSAGE, seq: seqOf(countOf(id.slice(cut + 1), "a message's number"), "seq"),
          payload: event === "binary" ? base64Bytes(data) : JSON.parse(data) };
      }
      case "ack": return { type: ACK, seq: countOf(data, "ack") };
      case "end": return { type: END, seq: countOf(data, "end") };
      case "error": return frameOf({ ...JSON.parse(data), t: ERROR });
      default: throw new ProtocolError(`an event the protocol does not know: ${event.slice(0, 40)}`);
    }
  } catch (error) {
    if (error instanceof ProtocolError) throw error;
    throw new ProtocolError(`an event the protocol does not know: ${error.message}`);
  }
}

// -- the stream ----------------------------------------------------------------------------

// Every browser has CustomEvent; Node has it from 19 (its tests run this module there too).
const StreamEvent = globalThis.CustomEvent ?? class extends Event {
  constructor(type, init = {}) { super(type); this.detail = init.detail ?? null; }
};

const now = () => performance.now();

function pauseOf(attempt, [first, most], random = Math.random) {
  const pause = attempt === 0 ? 0 : Math.min(most, first * 2 ** (attempt - 1));
  return pause * (0.5 + random());
}
export { pauseOf as backoffPause };

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) { resolve(); return; }
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function checkOptions(options) {
  const unknown = Object.keys(options).filter((name) => !(name in DEFAULTS));
  if (unknown.length) throw new RangeError(`unknown options: ${unknown.join(", ")} (known: ${Object.keys(DEFAULTS).join(", ")})`);
  const o = { ...DEFAULTS, ...options };
  for (const name of ["maxUnackedBytes", "maxMessageBytes", "ackEvery"]) {
    if (!Number.isSafeInteger(o[name]) || o[name] < 1) throw new RangeError(`${name} must be a positive integer, not ${o[name]}`);
  }
  for (const name of ["ackDelayMs", "resumeTimeoutMs", "connectTimeoutMs", "silenceMs"]) {
    if (typeof o[name] !== "number" || !Number.isFinite(o[name]) || o[name] <= 0) {
      throw new RangeError(`${name} must be a finite positive duration in ms, not ${o[name]}`);
    }
  }
  const [first, most] = o.backoffMs;
  if (!(first > 0 && most >= first && Number.isFinite(most))) throw new RangeError("backoffMs is [first, most], 0 < first <= most");
  if (o.maxMessageBytes > o.maxUnackedBytes) throw new RangeError("maxMessageBytes must be at most maxUnackedBytes");
  return o;
}

/**
 * A resumable stream's client end: one logical stream over as many connections as it
 * takes. `connect(signal)` makes a new connection (an object with hello(frame),
 * sendMessage(seq, payload, text, ack), sendAck(seq), sendEnd(last), frames() (an async
 * iterable of frames), closeCode, closeReason and close()); openWebSocketStream and
 * openEventStream make one for their transport.
 *
 * Events (it is an EventTarget): "open" (the first ready), "resuming" (a connection
 * broke; detail.reason), "resumed" (a later ready: detail.seconds from the break,
 * detail.connections), "ended" (the server's handler finished and everything it sent was
 * received), "failed" (detail.error: StreamRefused or StreamLost). `state` is one of
 * "connecting", "open", "resuming", "ended", "failed", "disconnected".
 */
export class ClientStream extends EventTarget {
  constructor(connect, options = {}) {
    super();
    this._connect = connect;
    this.options = checkOptions(options);
    this.token = null;
    this.recv = 0; // the highest server message received (delivered in order)
    this.consumed = 0; // the highest message of ours the server's handler consumed
    this.connections = 0;
    this.resumes = []; // seconds from each break to the next ready
    this.state = "connecting";
    this._next = 1;
    this._unacked = []; // {seq, payload, size, text}: sent, not consumed yet
    this._unackedBytes = 0;
    this._inbox = [];
    this._serverEnd = null;
    this._endedSent = false;
    this._acked = 0;
    this._ackTimer = null;
    this._conn = null;
    this._ready = false;
    this._opened = false;
    this._failure = null;
    this._closing = false;
    this._sending = Promise.resolve(); // one sender at a time: no message overtakes another
    this._stop = new AbortController(); // disconnect()
    this._wake = null;
    this._woken = new Promise((resolve) => { this._wake = resolve; });
    this._running = null;
  }

  // -- lifetime -------------------------------------------------------------------------

  /** Open the stream: resolves once the server said ready (rejects with StreamRefused or
   * StreamLost). */
  async start() {
    if (this._running === null) this._running = this._run();
    await this._wait(() => this._opened);
    return this;
  }

  /** Stop carrying the stream here (the server keeps it until its handler ends or it is
   * left alone for its detached timeout). Pending and later receive()/send() reject with
   * StreamDisconnected; iteration ends. */
  disconnect() {
    if (this._closing) return;
    this._closing = true;
    this._stop.abort();
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    const conn = this._conn;
    this._conn = null;
    this._ready = false;
    if (conn !== null) conn.close();
    if (this._failure === null) this._failure = new StreamDisconnected();
    this._setState("disconnected");
    this._changed();
  }

  // -- what the application uses -------------------------------------------------------

  /** Queue a message for the server (a JSON value, or bytes: ArrayBuffer or a view);
   * resolves with its number. Waits while the server has not consumed maxUnackedBytes of
   * what was sent. */
  async send(payload) {
    this._raiseFailure();
    if (this._endedSent) throw new Error("the stream's sending side was closed (close())");
    const binary = isBinary(payload);
    const entry = binary ? { payload: bytesOf(payload), text: null }
      : { payload, text: jsonText(payload) };
    entry.size = binary ? entry.payload.byteLength : encoder.encode(entry.text).length;
    if (entry.size > this.options.maxMessageBytes) {
      throw new ProtocolError(`a message of ${entry.size} bytes; the limit is ${this.options.maxMessageBytes}`);
    }
    await this._wait(() => this._unackedBytes + entry.size <= this.options.maxUnackedBytes
      || this._unacked.length === 0);
    if (this._endedSent) throw new Error("the stream's sending side was closed (close())");
    entry.seq = this._next;
    this._next += 1;
    this._unacked.push(entry);
    this._unackedBytes += entry.size;
    const conn = this._conn;
    if (conn !== null && this._ready) await this._sendUnsent(conn);
    return entry.seq;
  }

  /** Resolves once the server's handler consumed every message sent so far. */
  async flush() {
    const target = this._next - 1;
    await this._wait(() => this.consumed >= target);
  }

  /** Close the sending side: the server's iteration ends after our last message (the
   * server may go on sending). */
  async close() {
    if (this._endedSent) return;
    this._endedSent = true;
    const conn = this._conn;
    if (conn !== null && this._ready) {
      await this._sendUnsent(conn);
      await this._exclusive(async () => {
        try { await conn.sendEnd(this._next - 1); } catch { /* sent on the next connection */ }
      });
    }
  }

  /** The next server message; rejects with StreamEnded once the server's handler finished
   * and everything it sent was received. */
  async receive() {
    await this._wait(() => this._inbox.length > 0 || this._finished);
    if (this._inbox.length > 0) return this._inbox.shift();
    throw new StreamEnded();
  }

  [Symbol.asyncIterator]() {
    return {
      next: () => this.receive().then((value) => ({ value, done: false }), (error) => {
        if (error instanceof StreamEnded || error instanceof StreamDisconnected) return { value: undefined, done: true };
        throw error;
      }),
      [Symbol.asyncIterator]() { return this; },
    };
  }

  get _finished() { return this._serverEnd !== null && this.recv >= this._serverEnd; }

  _changed() {
    const wake = this._wake;
    this._woken = new Promise((resolve) => { this._wake = resolve; });
    wake();
  }

  async _wait(condition) {
    while (!condition()) {
      this._raiseFailure();
      await this._woken;
    }
    if (this._inbox.length === 0) this._raiseFailure();
  }

  _raiseFailure() { if (this._failure !== null) throw this._failure; }

  _setState(state, detail = null) {
    if (this.state === state || this.state === "disconnected" || this.state === "failed") return;
    this.state = state;
    if (detail !== null) this.dispatchEvent(new StreamEvent(state === "open" ? "open" : state, { detail }));
  }

  _fail(error) {
    if (this._failure === null) this._failure = error;
    this._setState("failed", { error });
    this._changed();
  }

  // -- the connections -------------------------------------------------------------------

  async _run() {
    let broken = null;
    let attempt = 0;
    while (!this._closing) {
      const attemptAbort = new AbortController();
      const stop = () => attemptAbort.abort(new StreamDisconnected());
      this._stop.signal.addEventListener("abort", stop, { once: true });
      const left = broken === null ? Infinity : broken + this.options.resumeTimeoutMs - now();
      let readyHere = false;
      const timer = setTimeout(() => {
        if (!readyHere) attemptAbort.abort(new ConnectionBroken("no ready within the attempt's time"));
      }, Math.max(0, Math.min(this.options.connectTimeoutMs, left)));
      let conn = null;
      let refusal = null;
      let reason = null;
      try {
        conn = await this._connect(attemptAbort.signal);
        attemptAbort.signal.addEventListener("abort", () => conn.close(), { once: true });
        if (attemptAbort.signal.aborted) throw attemptAbort.signal.reason;
        this.connections += 1;
        this._conn = conn;
        await conn.hello(this.token === null ? { type: OPEN }
          : { type: RESUME, token: this.token, recv: this.recv });
        for await (const frame of conn.frames()) {
          if (frame.type === READY) {
            readyHere = true;
            clearTimeout(timer);
            await this._onReady(frame, conn);
            if (!this._opened) {
              this._opened = true;
              this._setState("open", { token: this.token });
            } else {
              const seconds = broken === null ? 0 : (now() - broken) / 1000;
              this.resumes.push(seconds);
              this.state = "open";
              this.dispatchEvent(new StreamEvent("resumed", { detail: {
                seconds, connections: this.connections, token: this.token } }));
            }
            this._changed();
            broken = null;
            attempt = 0;
          } else if (frame.type === MESSAGE) {
            this._onMessage(frame, conn);
            if (frame.ack != null) this._onConsumed(frame.ack);
          } else if (frame.type === ACK) {
            this._onConsumed(frame.seq);
          } else if (frame.type === END) {
            this._serverEnd = frame.seq;
          } else if (frame.type === ERROR) {
            refusal = frame.refusal;
            reason = frame.message;
          }
          if (this._finished) { // decided before a reader wakes up to the end
            if (refusal !== null && !refusal.retry) {
              this._fail(new StreamRefused(refusal, reason ?? ""));
            } else {
              this._setState("ended", { last: this._serverEnd });
              this._changed();
            }
            await this._ackNow(conn);
            return;
          }
        }
        if (refusal === null) refusal = refusalOfClose(conn.closeCode);
        reason = reason || conn.closeReason || (conn.closeCode ? `closed with ${conn.closeCode}` : "closed");
      } catch (error) {
        if (error instanceof StreamRefused) {
          refusal = error.refusal;
          reason = error.message;
        } else if (error instanceof ProtocolError) {
          this._fail(error);
          return;
        } else {
          reason = error?.message ?? String(error);
        }
      } finally {
        clearTimeout(timer);
        this._stop.signal.removeEventListener("abort", stop);
        this._ready = false;
        if (this._conn === conn) this._conn = null;
        if (conn !== null) conn.close();
      }
      if (this._closing) return;
      if (refusal !== null && !refusal.retry) {
        this._fail(new StreamRefused(refusal, reason && reason !== refusal.name ? reason : ""));
        return;
      }
      const t = now();
      if (broken === null) {
        broken = t;
        if (this._opened) this._setState("resuming", { reason });
      }
      if (t - broken >= this.options.resumeTimeoutMs) {
        this._fail(new StreamLost(`no connection carried the stream for ${Math.round(this.options.resumeTimeoutMs / 1000)} s (last: ${reason})`));
        return;
      }
      const pause = Math.min(pauseOf(attempt, this.options.backoffMs), broken + this.options.resumeTimeoutMs - t);
      attempt += 1;
      await sleep(pause, this._stop.signal);
    }
  }

  _exclusive(work) {
    const run = this._sending.then(work);
    this._sending = run.catch(() => {});
    return run;
  }

  /** Send on `conn`, in order, every message not sent on it yet (conn.sent: the highest
   * sent on it). */
  _sendUnsent(conn) {
    return this._exclusive(async () => {
      try {
        while (this._conn === conn && this._unacked.length
               && this._unacked[this._unacked.length - 1].seq > conn.sent) {
          for (const entry of [...this._unacked]) {
            if (entry.seq > conn.sent && this._conn === conn) {
              const ack = this.recv > this._acked ? this.recv : null;
              await conn.sendMessage(entry.seq, entry.payload, entry.text, ack);
              conn.sent = entry.seq;
              if (ack !== null) { // carried: no wait for an acknowledgement alone
                this._acked = Math.max(this._acked, ack);
                this._carried();
              }
            }
          }
        }
      } catch {
        this._broken(conn); // sent again on the next connection
      }
    });
  }

  /** A send on `conn` failed: it is closed, so the stream resumes on a new one. */
  _broken(conn) {
    if (this._conn === conn) {
      this._ready = false;
      conn.close();
    }
  }

  async _onReady(frame, conn) {
    if (this.token !== null && frame.token !== this.token) throw new ProtocolError("the server resumed another stream");
    this.token = frame.token;
    this._onConsumed(frame.consumed);
    conn.sent = frame.consumed;
    // The resend goes beside the reading of this connection, not before it: a send
    // that waits on its transport (an event stream's POST, a full socket) would hold
    // back every frame the new server sends meanwhile. Messages sent meanwhile queue
    // behind it (one sender at a time); an end said before this ready goes after it,
    // one said later is close()'s to send.
    const ended = this._endedSent;
    this._ready = true;
    this._sendUnsent(conn).then(() => {
      if (ended && this._conn === conn) {
        return this._exclusive(() => conn.sendEnd(this._next - 1).catch(() => this._broken(conn)));
      }
      return undefined;
    });
  }

  _onMessage(frame, conn) {
    if (frame.seq <= this.recv) return; // replayed: received before
    if (frame.seq !== this.recv + 1) throw new ProtocolError(`server message ${frame.seq} after ${this.recv}: a gap`);
    this.recv = frame.seq;
    this._inbox.push(frame.payload);
    this._changed();
    if (this.recv - this._acked >= this.options.ackEvery) {
      this._ackNow(conn);
    } else if (this._ackTimer === null) {
      this._ackTimer = setTimeout(() => this._ackLater(), this.options.ackDelayMs);
    }
  }

  /** Everything received is acknowledged (a message carried it): the wait for an
   * acknowledgement alone starts again with the next message received. */
  _carried() {
    if (this.recv <= this._acked && this._ackTimer !== null) {
      clearTimeout(this._ackTimer);
      this._ackTimer = null;
    }
  }

  _ackLater() {
    this._ackTimer = null;
    const conn = this._conn;
    if (conn !== null && this.recv > this._acked) this._ackNow(conn);
  }

  async _ackNow(conn) {
    if (this.recv <= this._acked) return;
    const seq = this.recv;
    try {
      await conn.sendAck(seq);
      this._acked = Math.max(this._acked, seq);
    } catch {
      this._broken(conn);
    }
  }

  _onConsumed(seq) {
    if (seq >= this._next) throw new ProtocolError(`the server consumed message ${seq} of ${this._next - 1}`);
    if (seq > this.consumed) this.consumed = seq;
    while (this._unacked.length && this._unacked[0].seq <= seq) {
      this._unackedBytes -= this._unacked.shift().size;
    }
    this._changed();
  }
}

// -- transports -----------------------------------------------------------------------------

function absolute(url, schemes) {
  const base = globalThis.location?.href;
  const parsed = base === undefined ? new URL(url) : new URL(url, base);
  if (schemes !== null && parsed.protocol in schemes) parsed.protocol = schemes[parsed.protocol];
  return parsed.href;
}

/** Frames arriving on a connection, read in order by one consumer. */
class FrameQueue {
  constructor() { this._items = []; this._waiter = null; this._done = false; }
  push(item) {
    if (this._done) return;
    this._items.push(item);
    this._waiter?.();
  }
  finish(error = null) {
    if (this._done) return;
    if (error !== null) this._items.push({ error });
    this._done = true;
    this._waiter?.();
  }
  async *[Symbol.asyncIterator]() {
    for (;;) {
      if (this._items.length) {
        const item = this._items.shift();
        if (item.error) throw item.error;
        yield item.frame;
      } else if (this._done) {
        return;
      } else {
        await new Promise((resolve) => { this._waiter = resolve; });
        this._waiter = null;
      }
    }
  }
}

/** A stream's WebSocket connection. */
class WebSocketConnection {
  constructor(ws) {
    this.ws = ws;
    this.sent = 0;
    this.closeCode = null;
    this.closeReason = "";
    this._queue = new FrameQueue();
    ws.addEventListener("message", (event) => {
      try {
        if (typeof event.data === "string") {
          this._queue.push({ frame: decodeFrame(event.data) });
        } else {
          const [seq, payload] = decodeBinary(event.data);
          this._queue.push({ frame: { type: MESSAGE, seq, payload } });
        }
      } catch (error) {
        this._queue.finish(error);
        this.close();
      }
    });
    ws.addEventListener("close", (event) => {
      this.closeCode = event.code;
      this.closeReason = event.reason;
      this._queue.finish();
    });
  }

  _send(data) {
    if (this.ws.readyState !== WebSocket.OPEN) throw new ConnectionBroken("the WebSocket is closed");
    this.ws.send(data);
  }

  async hello(frame) { this._send(encodeFrame(frame)); }

  async sendMessage(seq, payload, text, ack = null) {
    if (isBinary(payload)) {
      this._send(encodeBinary(seq, payload));
      if (ack !== null) await this.sendAck(ack); // a binary frame carries none
    } else {
      this._send(encodeFrame({ type: MESSAGE, seq, payload, text, ack }));
    }
  }

  async sendAck(seq) { this._send(encodeFrame({ type: ACK, seq })); }

  async sendEnd(last) { this._send(encodeFrame({ type: END, seq: last })); }

  frames() { return this._queue; }

  close() {
    // The frames end now: a close handshake with a server that is gone takes a while.
    this._queue.finish();
    if (this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
  }
}

/** A function that opens a WebSocket of the stream protocol to `url` (resolves once
 * open). Browsers send the page's cookies with it, never custom headers. */
export function webSocketConnector(url) {
  const target = absolute(url, { "http:": "ws:", "https:": "wss:" });
  return (signal) => new Promise((resolve, reject) => {
    const ws = new WebSocket(target, SUBPROTOCOL);
    ws.binaryType = "arraybuffer";
    const conn = new WebSocketConnection(ws);
    const abort = () => { conn.close(); reject(signal.reason ?? new ConnectionBroken("aborted")); };
    signal.addEventListener("abort", abort, { once: true });
    ws.addEventListener("open", () => {
      signal.removeEventListener("abort", abort);
      if (ws.protocol !== SUBPROTOCOL) {
        conn.close();
        reject(new ProtocolError(`${target} does not speak ${SUBPROTOCOL}`));
      } else {
        resolve(conn);
      }
    }, { once: true });
    ws.addEventListener("close", (event) => {
      signal.removeEventListener("abort", abort);
      reject(new ConnectionBroken(`the WebSocket closed with ${event.code} before it opened`));
    }, { once: true });
  });
}

/** A stream's event stream (GET) and its POSTs. */
class EventStreamConnection {
  constructor(url, options, signal) {
    this.url = url;
    this.headers = options.headers ?? {};
    this.credentials = options.credentials ?? "same-origin";
    this.silenceMs = options.silenceMs;
    this.sent = 0;
    this.closeCode = null;
    this.closeReason = "";
    this.token = null;
    this.epoch = null; // the stream's epoch on this connection's server (its ready)
    this.response = null;
    this._abort = new AbortController();
    signal.addEventListener("abort", () => this.close(), { once: true });
  }

  async hello(frame) {
    const headers = new Headers(this.headers);
    headers.set("Accept", "text/event-stream");
    if (frame.type === RESUME) {
      headers.set(STREAM_HEADER, frame.token);
      headers.set(RECV_HEADER, String(frame.recv));
      this.token = frame.token;
    }
    this.response = await fetch(this.url, { headers, credentials: this.credentials,
      cache: "no-store", signal: this._abort.signal });
  }

  async _post(extra, body = null, contentType = null) {
    const headers = new Headers(this.headers);
    headers.set(STREAM_HEADER, this.token);
    // Each POST is routed on its own: one that reached a former server of the stream
    // (taken over, which it learns only at its next commit) would be taken there and
    // lost. Named, it is refused there (moved), and sent again where the stream is.
    if (this.epoch !== null) headers.set(EPOCH_HEADER, String(this.epoch));
    for (const [name, value] of Object.entries(extra)) headers.set(name, value);
    if (contentType !== null) headers.set("Content-Type", contentType);
    const answer = await fetch(this.url, { method: "POST", headers, body,
      credentials: this.credentials, cache: "no-store", signal: this._abort.signal });
    if (answer.status !== 202 && answer.status !== 204) {
      const text = await answer.text().catch(() => "");
      throw new ConnectionBroken(`a message's POST answered ${answer.status}: ${text.slice(0, 200)}`);
    }
    await answer.arrayBuffer().catch(() => null);
  }

  async sendMessage(seq, payload, text, ack = null) {
    const extra = { [SEQ_HEADER]: String(seq) };
    if (ack !== null) extra[ACK_HEADER] = String(ack); // one POST, not two
    if (isBinary(payload)) await this._post(extra, payload, "application/octet-stream");
    else await this._post(extra, text ?? jsonText(payload), "application/json");
  }

  async sendAck(seq) { await this._post({ [ACK_HEADER]: String(seq) }); }

  async sendEnd(last) { await this._post({ [END_HEADER]: String(last) }); }

  async *frames() {
    const response = this.response;
    this.closeCode = response.status;
    if (response.status !== 200) {
      let doc = null;
      try { doc = await response.json(); } catch { /* not ours: a proxy's answer */ }
      const found = typeof doc?.code === "string" ? refusalNamed(doc.code) : null;
      this.closeReason = typeof doc?.error === "string" ? doc.error : `HTTP ${response.status}`;
      if (found !== null) yield { type: ERROR, refusal: found, message: this.closeReason };
      return;
    }
    const type = response.headers.get("Content-Type") ?? "";
    if (!type.startsWith("text/event-stream")) throw new ProtocolError(`${this.url} does not answer with an event stream (${type.slice(0, 60)})`);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser();
    try {
      for (;;) {
        const silence = setTimeout(() => this.close(), this.silenceMs);
        let chunk;
        try {
          chunk = await reader.read();
        } finally {
          clearTimeout(silence);
        }
        if (chunk.done) return;
        for (const event of parser.feed(decoder.decode(chunk.value, { stream: true }))) {
          const frame = sseFrame(event, this.token);
          if (frame.type === READY) {
            this.token = frame.token;
            this.epoch = frame.epoch ?? null;
          }
          yield frame;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  close() { this._abort.abort(new ConnectionBroken("the event stream was closed")); }
}

/** A function that makes a stream's event-stream connection to `url`. */
export function eventStreamConnector(url, options = {}) {
  const target = absolute(url, null);
  const settings = { silenceMs: DEFAULTS.silenceMs, ...options };
  return async (signal) => new EventStreamConnection(target, settings, signal);
}

/** A resumable stream over WebSockets to `url` (ws:, wss:, http:, https: or relative to
 * the page), opened: resolves once the server said ready. The session goes by the page's
 * cookie (browsers send no custom WebSocket headers): the mesh must hash on that cookie,
 * and the server read the session from it. `options`: DEFAULTS. */
export async function openWebSocketStream(url, options = {}) {
  const stream = new ClientStream(webSocketConnector(url), options);
  try {
    return await stream.start();
  } catch (error) {
    stream.disconnect();
    throw error;
  }
}

/** A resumable stream over Server-Sent Events to `url`: the server's messages as the
 * events of a GET (read with fetch, so it can say which stream it resumes), ours as
 * POSTs. `options.headers` go with every request (a session header, if the mesh routes
 * on one); `options.credentials` is fetch's (default "same-origin": the page's
 * cookies); the rest: DEFAULTS. */
export async function openEventStream(url, options = {}) {
  const { headers, credentials, ...rest } = options;
  const stream = new ClientStream(eventStreamConnector(url, {
    headers, credentials, silenceMs: rest.silenceMs ?? DEFAULTS.silenceMs }), rest);
  try {
    return await stream.start();
  } catch (error) {
    stream.disconnect();
    throw error;
  }
}
