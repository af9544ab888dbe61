"""The demo's stateful gRPC service: the per-session counter of :mod:`meshxl.demo.app`
over gRPC (``meshxl.demo.v1.Counter``, :mod:`meshxl.local.counter`), its state only in
the member's statesync sidecar.

The session is the call's ``x-session-id`` metadata. Loading and saving are meshxl's
gRPC interceptor (:mod:`meshxl.client.interceptor`): ``Increment`` adds one to ``seq``
(the answer leaves once the write is acknowledged; a lost compare-and-set runs the call
again on fresh state, up to three times, then ``ABORTED``), ``Current`` reads it, and
the server-streaming ``Watch`` adds one every ``interval_ms`` and sends each value after
its write (``commit``). A sidecar that fails answers ``UNAVAILABLE``, which Envoy
retries on another member. ``meshxl.demo.v1.Tally`` is the resumable streams' tally
(:mod:`meshxl.demo.tally`): its calls keep their own state, so the interceptor passes
them untouched.

The member serves the standard health service (grpc.health.v1, the reference
implementation from grpcio-health-checking), ``SERVING`` while its sidecar is ready:
what the gRPC cluster's health check asks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

import grpc
from grpc import aio

from meshxl.addr import GRPC_SERVER_OPTIONS, bind_grpc
from meshxl.binaries import install_hint
from meshxl.client import AsyncClient, Backoff, ClientSettings
from meshxl.client.interceptor import AsyncSessionInterceptor, commit, current_session
from meshxl.demo.signals import until_stopped
from meshxl.demo.tally import grpc_handlers
from meshxl.errors import MeshxlError
from meshxl.local import counter
from meshxl.streams import StreamHost
from meshxl.streams import grpcio as streams_service
from meshxl.streams.grpcio import acknowledgements

log = logging.getLogger("meshxl.demo.grpc_app")

READY_POLL = 0.2
CONFLICT_RETRIES = 2
SIDECAR_SETTINGS = ClientSettings(timeout=5.0, unavailable=Backoff(attempts=1))
STREAM_SETTINGS = ClientSettings(timeout=5.0, unavailable=Backoff(attempts=2, first=0.02))
"""The streams' client: a stream's commits are tried again by its host."""


def _seq(state: Any) -> int:
    try:
        return int(state.get("seq", 0)) if state else 0
    except (AttributeError, TypeError, ValueError):
        return 0


class Counter:
    """The service's handlers (the interceptor has loaded the call's session)."""

    def __init__(self, member: str) -> None:
        self.member = member

    def _reply(self, seq: int) -> Any:
        session = current_session()
        return counter.CounterReply(member=self.member, session=session.id, seq=seq)

    def _increment(self) -> int:
        session = current_session()
        seq = _seq(session.state) + 1
        session.state = {"seq": seq, "member": self.member}
        return seq

    async def increment(self, request: Any, context: aio.ServicerContext) -> Any:
        return self._reply(self._increment())

    async def current(self, request: Any, context: aio.ServicerContext) -> Any:
        return self._reply(_seq(current_session().state))

    async def watch(self, request: Any, context: aio.ServicerContext) -> Any:
        interval = max(request.interval_ms, 10) / 1000
        sent = 0
        while request.count == 0 or sent < request.count:
            seq = self._increment()
            await commit()  # acknowledged before the client sees it
            yield self._reply(seq)
            sent += 1
            await asyncio.sleep(interval)

    def handlers(self) -> grpc.GenericRpcHandler:
        request, reply, watch = (counter.CounterRequest, counter.CounterReply,
                                 counter.WatchRequest)
        return grpc.method_handlers_generic_handler(counter.SERVICE, {
            "Increment": grpc.unary_unary_rpc_method_handler(
                self.increment, request_deserializer=request.FromString,
                response_serializer=reply.SerializeToString),
            "Current": grpc.unary_unary_rpc_method_handler(
                self.current, request_deserializer=request.FromString,
                response_serializer=reply.SerializeToString),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self.watch, request_deserializer=watch.FromString,
                response_serializer=reply.SerializeToString),
        })


async def _follow_sidecar(probe: AsyncClient, health: Any, streams: StreamHost) -> None:
    """SERVING while the sidecar is ready (Envoy's grpc.health.v1 check asks this); the
    streams handed on when it says a planned move is under way."""
    from grpc_health.v1 import health_pb2

    while True:
        try:
            readiness = await probe.ready()
            ready = readiness.ready
            streams.note_moving(readiness.moving)
        except MeshxlError:
            ready = False
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await health.set("", status)
        await asyncio.sleep(READY_POLL)


async def serve(member: str, listen: str, sidecar: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    from grpc_health.v1 import health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    client = AsyncClient(sidecar, settings=SIDECAR_SETTINGS)
    probe = AsyncClient(sidecar, settings=ClientSettings(
        timeout=READY_POLL * 2, connect_timeout=READY_POLL * 2,
        unavailable=Backoff(attempts=1)))
    streams = StreamHost(AsyncClient(sidecar, settings=STREAM_SETTINGS))
    server = aio.server(interceptors=[AsyncSessionInterceptor(
        client, retries=CONFLICT_RETRIES,
        passthrough=(counter.TALLY, streams_service.SERVICE))],
        options=GRPC_SERVER_OPTIONS)
    server.add_generic_rpc_handlers((Counter(member).handlers(),
                                     grpc_handlers(streams, member),
                                     acknowledgements(streams)))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bind_grpc(server, listen)
    await server.start()
    follower = asyncio.create_task(_follow_sidecar(probe, health, streams))
    log.info("gRPC member %s serving on %s, state in %s", member, listen, sidecar)
    try:
        await until_stopped()
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await streams.aclose()
        await server.stop(1.0)
        await streams.sessions.close()
        await client.close()
        await probe.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshxl.demo.grpc_app",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="this member's name")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--sidecar", required=True, metavar="URL")
    parser.add_argument("--cluster", default="demo")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import grpc_health  # noqa: F401
    except ImportError:
        parser.exit(1, "meshxl.demo.grpc_app: the gRPC demo needs grpcio-health-checking "
                       f"({install_hint('demo', 'grpcio-health-checking')})\n")
    asyncio.run(serve(args.name, args.listen, args.sidecar))
    return 0


if __name__ == "__main__":
    from meshxl.exiting import run_main

    run_main(main)
