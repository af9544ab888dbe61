"use strict";
// One Socket.IO server of bench/streams.py's peer: the tally of meshxl's demo
// (meshxl/demo/tally.py) as a Socket.IO application would write it, with what Socket.IO
// offers for streams that outlive a connection: connection state recovery
// (connectionStateRecovery) over the Redis Streams adapter, so any server can restore a
// session and replay the packets it missed.
//
//   node server.js NAME PORT REDIS_URL
//
// A client sends "m" {seq, n} (with an acknowledgement: the client's retries give
// at-least-once delivery); the server adds n to the client's tally, kept in Redis
// (HINCRBY, so it outlives the server like meshxl's committed state), answers "a"
// {seq, n, total, member} and acknowledges. With connection state recovery every
// socket.emit goes through the adapter (XADD to the Redis stream) before it is sent.
// GET /healthz answers 200 for the proxy's health checks.

const http = require("node:http");
const { Server } = require("socket.io");
const { createClient } = require("redis");
const { createAdapter } = require("@socket.io/redis-streams-adapter");

async function main() {
  const [name, port, redisUrl] = process.argv.slice(2);
  if (!name || !port || !redisUrl) {
    console.error("usage: node server.js NAME PORT REDIS_URL");
    process.exit(2);
  }
  const redis = createClient({ url: redisUrl });
  redis.on("error", (err) => console.error(`redis: ${err.message}`));
  await redis.connect();
  const server = http.createServer((req, res) => {
    // Socket.IO answers its own path; this listener gets every other request.
    const ok = req.url === "/healthz";
    res.writeHead(ok ? 200 : 404, { "content-type": "text/plain" });
    res.end(ok ? "ok\n" : "not found\n");
  });
  const io = new Server(server, {
    adapter: createAdapter(redis),
    transports: ["websocket"],
    connectionStateRecovery: { maxDisconnectionDuration: 120000, skipMiddlewares: true },
  });
  io.on("connection", (socket) => {
    const id = String(socket.handshake.auth.id || socket.id);
    socket.on("m", async (msg, ack) => {
      const n = Number(msg && msg.n);
      const total = await redis.hIncrBy("tally", id, Number.isInteger(n) ? n : 0);
      socket.emit("a", { seq: msg.seq, n, total, member: name });
      if (typeof ack === "function") ack();
    });
  });
  server.listen(Number(port), "127.0.0.1", () => console.log(`${name} listening on ${port}`));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
