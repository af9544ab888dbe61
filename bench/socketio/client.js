"use strict";
// The clients of bench/streams.py's Socket.IO peer: STREAMS sockets, each sending the
// tally's message {seq, n} every INTERVAL_MS and reading the answers, through the proxy.
//
//   node client.js URL STREAMS INTERVAL_MS OUT STATUS PREFIX
//
// Socket.IO's reliability options as its documentation gives them: connection state
// recovery on the server (missed packets replayed to a recovered session), and on the
// client `retries` with an `ackTimeout` of 10 s (every message kept until the server
// acknowledges it, sent again after the timeout or a reconnection: at-least-once; a
// shorter timeout sends messages again on a busy machine while their first copy is
// still on its way), and a reconnection delay of 20 ms to 1 s (meshxl's stream
// client's backoff).
//
// STATUS is rewritten every 200 ms ({connected, answers, resumed}: how many sockets
// received an answer on a later connection than their first); SIGUSR1 stops the
// sending, waits up to 15 s for every message's answer, writes OUT (every message sent
// and every answer, with wall-clock times in ms, per socket) and exits; SIGTERM writes
// OUT at once.

const fs = require("node:fs");
const { io } = require("socket.io-client");

const [url, streamsArg, intervalArg, out, status, prefix] = process.argv.slice(2);
const count = Number(streamsArg);
const interval = Number(intervalArg);
if (!url || !(count > 0) || !(interval > 0) || !out || !status) {
  console.error("usage: node client.js URL STREAMS INTERVAL_MS OUT STATUS PREFIX");
  process.exit(2);
}

const now = () => performance.timeOrigin + performance.now();
const streams = [];
let stopping = false;

function open(k) {
  const id = `${prefix || "sio"}${String(k).padStart(4, "0")}`;
  const socket = io(url, {
    forceNew: true,
    transports: ["websocket"],
    auth: { id },
    extraHeaders: { "x-session-id": id },
    reconnectionDelay: 20,
    reconnectionDelayMax: 1000,
    retries: 1000000,
    ackTimeout: 10000,
  });
  const s = { id, socket, seq: 0, conn: 0, sent: [], answers: [], connects: [],
              disconnects: [], errors: 0, timer: null };
  let rng = k + 1;
  s.next = () => {
    rng = (rng * 1103515245 + 12345) % 2147483648;
    return 1 + (rng % 9);
  };
  socket.on("connect", () => {
    s.conn += 1;
    s.connects.push([now(), socket.recovered === true]);
  });
  socket.on("disconnect", (reason) => s.disconnects.push([now(), String(reason)]));
  socket.on("connect_error", () => { s.errors += 1; });
  socket.on("a", (a) => {
    s.answers.push([a.seq, a.n, a.total, a.member, now(), s.conn]);
  });
  streams.push(s);
  return s;
}

function send(s) {
  if (stopping) return;
  s.seq += 1;
  const n = s.next();
  s.sent.push([s.seq, n, now()]);
  s.socket.emit("m", { seq: s.seq, n }, () => {});
}

function answered(s) {
  const seen = new Set(s.answers.map((a) => a[0]));
  return s.sent.every((m) => seen.has(m[0]));
}

function writeStatus() {
  const doc = {
    connected: streams.filter((s) => s.socket.connected).length,
    answers: streams.reduce((sum, s) => sum + s.answers.length, 0),
    resumed: streams.filter((s) => s.answers.some((a) => a[5] > 1)).length,
    all_answered: streams.every(answered),
  };
  fs.writeFileSync(`${status}.tmp`, JSON.stringify(doc));
  fs.renameSync(`${status}.tmp`, status);
}

function finish() {
  const doc = streams.map((s) => ({
    id: s.id, sent: s.sent, answers: s.answers, connects: s.connects,
    disconnects: s.disconnects, connect_errors: s.errors,
  }));
  fs.writeFileSync(out, JSON.stringify({ streams: doc }));
  for (const s of streams) s.socket.close();
  process.exit(0);
}

process.on("SIGTERM", finish);
process.on("SIGUSR1", () => {
  stopping = true;
  for (const s of streams) clearInterval(s.timer);
  const deadline = now() + 15000;
  const check = setInterval(() => {
    if (streams.every(answered) || now() > deadline) {
      clearInterval(check);
      finish();
    }
  }, 50);
});

// Open the sockets 50 at a time, 100 ms apart (meshxl's streams open 64 at a time):
// a thousand handshakes at once is a connect storm, not this measurement.
for (let k = 0; k < count; k++) {
  setTimeout(() => {
    const s = open(k);
    // Spread the streams' messages over one interval.
    setTimeout(() => {
      s.timer = setInterval(() => send(s), interval);
    }, (interval * k) / count);
  }, 100 * Math.floor(k / 50));
}
setInterval(writeStatus, 200);
writeStatus();
