"""Takeovers in batches: the streams of a member that died all resume on another at
once, and their records are read in one bulk get and claimed in one bulk save, each
refused for its own reason (docs/streams.md). Pure: the sidecar's client is a stand-in
keeping records in a dict, no socket is opened."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from meshxl.client import Session, SidecarError, Upsert, Written
from meshxl.client.errors import SidecarNotFound, SidecarPreconditionFailed
from meshxl.streams.host import Refused, StreamHost
from meshxl.streams.protocol import FORBIDDEN, MALFORMED, TOO_FAR_BEHIND, UNKNOWN, new_token
from meshxl.streams.record import StreamRecord, record_id


class _Sidecar:
    """The sessions a stand-in sidecar keeps: ``{id: (bytes, revision)}``."""

    def __init__(self) -> None:
        self.kept: dict[str, tuple[bytes, int]] = {}
        self.revision = 0
        self.calls: list[tuple[str, int]] = []
        self.interfere: set[str] = set()
        """Sessions another server writes between their read and their claim, once."""

    def put_record(self, session_id: str, record: StreamRecord) -> None:
        self.revision += 1
        self.kept[session_id] = (record.encode(), self.revision)

    async def bulk_get(self, ids: list[str]) -> list[Session | SidecarError]:
        self.calls.append(("get", len(ids)))
        await asyncio.sleep(0)
        out: list[Session | SidecarError] = []
        for sid in ids:
            if sid not in self.kept:
                out.append(SidecarNotFound("no such session", status=404))
                continue
            data, rev = self.kept[sid]
            out.append(Session(id=sid, state=data, etag=f'"{rev}"', owner="a",
                               content_type="application/octet-stream", source="etcd"))
            if sid in self.interfere:
                self.interfere.discard(sid)
                self.revision += 1
                self.kept[sid] = (data, self.revision)
        return out

    async def bulk_save(self, items: Sequence[Upsert]) -> list[Written | SidecarError]:
        self.calls.append(("save", len(items)))
        await asyncio.sleep(0)
        out: list[Written | SidecarError] = []
        for item in items:
            _, rev = self.kept[item.session]
            if item.if_match != f'"{rev}"':
                out.append(SidecarPreconditionFailed("written since", status=412))
                continue
            self.revision += 1
            self.kept[item.session] = (bytes(item.state), self.revision)
            out.append(Written(session=item.session, etag=f'"{self.revision}"', owner="b",
                               created=False, takeover=True, replicated=True))
        return out


class _Conduit:
    async def send_messages(self, messages: Any, ack: int | None = None,
                            texts: Any = None) -> None: ...

    async def send_ack(self, consumed: int) -> None: ...

    async def send_end(self, last: int, failure: Any) -> None: ...

    async def close(self, refusal: Any) -> None: ...


async def _handler(stream: Any) -> None:
    async for _ in stream:
        pass


def _stored(sidecar: _Sidecar, session: str, *, out: int = 3, acked: int = 1) -> str:
    token = new_token()
    sidecar.put_record(record_id(token), StreamRecord(
        session=session, kind="websocket", consumed=2, out=out, acked=acked,
        journal=[(s, {"m": s}) for s in range(acked + 1, out + 1)]))
    return token


async def test_a_storm_of_resumes_is_read_and_claimed_in_one_request_each() -> None:
    sidecar = _Sidecar()
    host = StreamHost(sidecar)  # type: ignore[arg-type]
    tokens = [_stored(sidecar, f"s{k}") for k in range(100)]
    resumed = await asyncio.gather(*(host.resume(f"s{k}", "websocket", t, 2, _handler,
                                                 _Conduit())
                                     for k, t in enumerate(tokens)))
    # At most max_batch (64) in one request; the batches go side by side.
    assert sidecar.calls == [("get", 64), ("get", 36), ("save", 64), ("save", 36)], \
        sidecar.calls
    for (stream, replay), token in zip(resumed, tokens, strict=True):
        assert stream.token == token and stream.resumed and stream.record.epoch == 2
        assert replay == [(3, {"m": 3})]  # what the client has not received
        assert StreamRecord.decode(sidecar.kept[record_id(token)][0]).epoch == 2
    await host.aclose()


async def test_a_stream_resumed_twice_at_once_is_in_one_batch_at_a_time() -> None:
    """Batches go side by side, but a stream's two resumes never do (each batch writes a
    key once): the later one is read after the earlier one's claim, and carries it."""
    sidecar = _Sidecar()
    host = StreamHost(sidecar, max_batch=2)  # type: ignore[arg-type]
    tokens = [_stored(sidecar, f"s{k}") for k in range(4)]
    twice = [(0, tokens[0]), (1, tokens[1]), (0, tokens[0]), (2, tokens[2]), (3, tokens[3])]
    resumed = await asyncio.gather(*(host.resume(f"s{k}", "websocket", t, 2, _handler,
                                                 _Conduit()) for k, t in twice))
    assert sidecar.calls == [("get", 2), ("get", 2), ("save", 2), ("save", 2),
                             ("get", 1), ("save", 1)], sidecar.calls
    assert resumed[2][0].record.epoch == 3 and host.live[tokens[0]] is resumed[2][0]
    await host.aclose()


async def test_each_takeover_of_a_batch_is_refused_for_its_own_reason() -> None:
    sidecar = _Sidecar()
    host = StreamHost(sidecar)  # type: ignore[arg-type]
    good = _stored(sidecar, "mine")
    theirs = _stored(sidecar, "other")
    behind = _stored(sidecar, "mine", out=5, acked=4)
    ahead = _stored(sidecar, "mine")
    contested = _stored(sidecar, "mine")
    sidecar.interfere.add(record_id(contested))  # its server writes it once more
    cases = [(good, 2, None), (new_token(), 0, UNKNOWN), (theirs, 2, FORBIDDEN),
             (behind, 2, TOO_FAR_BEHIND), (ahead, 9, MALFORMED), (contested, 2, None)]
    results = await asyncio.gather(
        *(host.resume("mine", "websocket", token, recv, _handler, _Conduit())
          for token, recv, _ in cases), return_exceptions=True)
    for (token, _, refusal), result in zip(cases, results, strict=True):
        if refusal is None:
            assert not isinstance(result, BaseException), (token, result)
            assert result[0].token == token
        else:
            assert isinstance(result, Refused) and result.refusal is refusal, result
    # One read and one claim for the batch; the contested one read and claimed again.
    assert sidecar.calls == [("get", 6), ("save", 2), ("get", 1), ("save", 1)], sidecar.calls
    await host.aclose()


async def test_a_sidecar_that_fails_refuses_the_batch_so_its_clients_try_again() -> None:
    sidecar = _Sidecar()
    host = StreamHost(sidecar)  # type: ignore[arg-type]
    token = _stored(sidecar, "s")

    async def down(ids: list[str]) -> list[Session | SidecarError]:
        raise SidecarError("the sidecar does not answer")

    sidecar.bulk_get = down  # type: ignore[method-assign]
    with pytest.raises(Refused) as refused:
        await host.resume("s", "websocket", token, 2, _handler, _Conduit())
    assert refused.value.refusal.retry
    await host.aclose()
