"""Model input that would cause an outage: empty input, partial writes, re-reads."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshxl.cli import main
from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import EtcdMeshSource
from meshxl.xds.sources import ModelFileSource
from tests.unit.test_sources import GOOD, until


def _touch(path: Path, step: int) -> None:
    """A distinct mtime per write, whatever the file system's timestamp resolution."""
    now = time.time_ns() + step * 1_000_000
    os.utime(path, ns=(now, now))


@pytest.mark.parametrize("written", ["", "# being rewritten\n", "clusters: []\n",
                                     "clusters:\n  - name: web\n    members: [{name: a, addr"])
async def test_reload_never_acts_on_an_empty_or_partial_file(
        tmp_path: Path, written: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(GOOD)
    changes: list[int] = []
    source = ModelFileSource(path, lambda: changes.append(1), interval=0.01)
    good = source.load()
    task = asyncio.create_task(source.run())
    try:
        path.write_text(written)
        _touch(path, 1)
        await until(lambda: source.refused == 1)
        assert source.model is good and not changes
        assert source.error is not None
        lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_reload_waits_for_the_file_to_stand_still(tmp_path: Path) -> None:
    """A file that changes at every poll is never read; once it stops, it is."""
    path = tmp_path / "model.yaml"
    path.write_text(GOOD)
    changes: list[int] = []
    # Polls far apart, writes close together: every poll sees the file changed since
    # the one before, however late a busy machine runs the writer.
    source = ModelFileSource(path, lambda: changes.append(1), interval=0.25)
    source.load()
    task = asyncio.create_task(source.run())
    try:
        text = GOOD.replace("8081", "8082")
        for step in range(1, 40):  # a slow writer: a few bytes more between polls
            path.write_text(text[: len(text) * step // 40])
            _touch(path, step)
            await asyncio.sleep(0.01)
        assert not changes and source.refused == 0
        path.write_text(text)
        _touch(path, 41)
        await until(lambda: changes)
        assert source.model is not None
        assert source.model.clusters[0].members[0].port == 8082
        assert source.refused == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("stored", [b"", b"# nothing\n", b"clusters: []\n", b"\xff\xfe",
                                    b"clusters: [{name: web"])
def test_stored_model_that_is_empty_or_undecodable_keeps_the_last_good(stored: bytes) -> None:
    keys = Keys()
    pokes: list[int] = []
    mesh = EtcdMeshSource(None, keys, lambda: pokes.append(1))  # type: ignore[arg-type]
    mesh._values = {keys.model: GOOD.encode()}
    mesh._rebuild()
    good = mesh.model
    assert good is not None and good.clusters
    mesh._values = {keys.model: stored}
    mesh._rebuild()
    assert mesh.model is good
    assert mesh.model_error is not None
    del mesh._values[keys.model]  # deleted: nothing new to serve either
    mesh._rebuild()
    assert mesh.model is good


def test_stored_model_may_be_empty_on_purpose() -> None:
    keys = Keys()
    mesh = EtcdMeshSource(None, keys, lambda: None)  # type: ignore[arg-type]
    mesh._values = {keys.model: b"clusters: []\nallow_empty: true\n"}
    mesh._rebuild()
    assert mesh.model is not None and mesh.model.clusters == []


# -- the CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "# nothing yet\n", "clusters: []\n"])
def test_validate_refuses_an_empty_model_from_a_file_or_stdin(tmp_path: Path,
                                                               text: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    for args, stdin in (([str(path)], None), (["-"], text)):
        result = CliRunner().invoke(main, ["validate", *args], input=stdin)
        assert result.exit_code == 1, result.output
        assert "withdraw every listener" in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_validate_reads_stdin() -> None:
    result = CliRunner().invoke(main, ["validate", "-"], input=GOOD)
    assert result.exit_code == 0, result.output
    assert "<stdin>: ok (1 clusters, 1 members)" in result.output
    result = CliRunner().invoke(main, ["validate", "-"],
                                input="clusters: []\nallow_empty: true\n")
    assert result.exit_code == 0, result.output


def test_apply_refuses_an_empty_model_before_reaching_etcd() -> None:
    # The etcd address is unreachable: the refusal must come first, from the text.
    result = CliRunner().invoke(main, ["apply", "-", "--etcd", "http://127.0.0.1:9"],
                                input="")
    assert result.exit_code == 1
    assert "the model is empty" in result.output


def test_apply_reads_its_input_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The text stored is the text validated: the file is opened once."""
    import meshxl.operator.actions

    path = tmp_path / "m.yaml"
    path.write_text(GOOD)
    stored: list[str] = []

    class Applied:
        unchanged, clusters, revision = False, 1, 7

    async def fake_apply(client: object, keys: Keys, text: str, source: str) -> Applied:
        stored.append(text)
        os.truncate(path, 0)  # a concurrent rewrite after the read changes nothing
        return Applied()

    class FakeClient:
        async def __aenter__(self) -> FakeClient:
            return self

        async def __aexit__(self, *_: object) -> None:
            return None

    opened: list[str] = []
    real_open = Path.open

    def counting_open(self: Path, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if self == path:
            opened.append(str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(meshxl.operator.actions, "apply_model", fake_apply)
    monkeypatch.setattr("meshxl.cli.model.etcd_client", lambda urls: FakeClient())
    monkeypatch.setattr(Path, "open", counting_open)
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("read twice"))
    result = CliRunner().invoke(main, ["apply", str(path), "--etcd", "http://127.0.0.1:9"])
    assert result.exit_code == 0, result.output
    assert stored == [GOOD]
    assert len(opened) == 1

    result = CliRunner().invoke(main, ["apply", "-", "--etcd", "http://127.0.0.1:9"],
                                input=GOOD)
    assert result.exit_code == 0, result.output
    assert stored[-1] == GOOD


@pytest.mark.parametrize("node_id", ["", "a/b", "x" * 300, "two words"])
def test_bootstrap_refuses_bad_node_ids_in_one_line(node_id: str) -> None:
    result = CliRunner().invoke(main, ["bootstrap", "--node-id", node_id,
                                       "--xds", "127.0.0.1:18000"])
    assert result.exit_code != 0
    assert "node id" in result.output
    assert len(result.output.strip().splitlines()) == 1

