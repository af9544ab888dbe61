// The demo's stream page (/streams/): a tally over a WebSocket stream and a Server-Sent
// Events stream, kept by meshxl's browser client across the death of their member.
// Query: count (messages per stream, default 1000), interval (ms between them, default
// 500), kinds (default "ws,sse"). Everything sent and received is in window.tally, so a
// test (tests/integration/test_streams_browser.py) can check it.

import { openEventStream, openWebSocketStream } from "/meshxl-streams.js";

const query = new URLSearchParams(location.search);
const count = Number(query.get("count") ?? 1000);
const interval = Number(query.get("interval") ?? 500);
const kinds = (query.get("kinds") ?? "ws,sse").split(",").filter((k) => k === "ws" || k === "sse");
const URLS = { ws: "/streams/ws", sse: "/streams/sse" };

const tally = { count, interval, streams: {} };
window.tally = tally;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Every answer once, in order, applied once: the tally after each is the sum of what
 * was sent up to it. */
function check(record) {
  let total = 0;
  for (const [i, answer] of record.answers.entries()) {
    total += record.sent[i];
    if (answer.seq !== i + 1) return `answer ${i + 1} is for message ${answer.seq}`;
    if (answer.total !== total) return `after message ${i + 1} the tally is ${answer.total}, not ${total}`;
  }
  return "ok";
}

function event(kind, text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toISOString().slice(11, 23)} ${kind}: ${text}`;
  document.getElementById("events").append(item);
  tally.streams[kind].events.push(text);
}

function render(kind) {
  const record = tally.streams[kind];
  let row = document.querySelector(`tr[data-kind="${kind}"]`);
  if (row === null) {
    row = document.createElement("tr");
    row.dataset.kind = kind;
    for (const name of ["kind", "state", "sent", "answered", "total", "member", "resumes", "check"]) {
      const cell = document.createElement("td");
      cell.className = name;
      row.append(cell);
    }
    document.querySelector("#streams tbody").append(row);
  }
  const last = record.answers.at(-1) ?? {};
  record.check = check(record);
  row.dataset.check = record.check === "ok" ? "ok" : "broken";
  row.dataset.state = record.state;
  const cells = { kind, state: record.state, sent: record.sent.length,
    answered: record.answers.length, total: last.total ?? "", member: last.member ?? "",
    resumes: record.resumes.map((s) => `${Math.round(s * 1000)} ms`).join(", "),
    check: record.check };
  for (const [name, value] of Object.entries(cells)) row.querySelector(`td.${name}`).textContent = value;
}

async function run(kind) {
  const record = { sent: [], answers: [], resumes: [], events: [], state: "connecting",
    error: null, done: false, check: "ok" };
  tally.streams[kind] = record;
  render(kind);
  try {
    const open = kind === "ws" ? openWebSocketStream : openEventStream;
    const stream = await open(URLS[kind]);
    record.token = stream.token;
    const update = () => { record.state = stream.state; render(kind); };
    stream.addEventListener("resuming", (e) => { update(); event(kind, `connection lost (${e.detail.reason}): resuming`); });
    stream.addEventListener("resumed", (e) => {
      record.resumes.push(e.detail.seconds);
      update();
      event(kind, `resumed after ${Math.round(e.detail.seconds * 1000)} ms (connection ${e.detail.connections})`);
    });
    update();
    event(kind, "open");
    const reading = (async () => {
      for await (const answer of stream) {
        record.answers.push(answer);
        render(kind);
      }
    })();
    for (let i = 0; i < count; i += 1) {
      const n = 1 + Math.floor(Math.random() * 9);
      record.sent.push(n);
      render(kind);
      await stream.send({ n });
      await sleep(interval);
    }
    await stream.close(); // the server's handler ends after our last message
    await reading; // ...and the stream with it, once everything it sent is here
    update();
    event(kind, `ended after ${record.answers.length} answers: ${record.check}`);
    stream.disconnect();
  } catch (error) {
    record.error = `${error.name}: ${error.message}`;
    record.state = "failed";
    render(kind);
    event(kind, record.error);
  }
  record.done = true;
}

for (const kind of kinds) run(kind);
