"""Every ``meshxl ...`` command the README and the docs show is one the real CLI has.

Commands are read from fenced code blocks (lines starting ``meshxl``, continued by a
trailing backslash) and from inline code (`` `meshxl ...` ``). Each is resolved through
the real click groups (an unknown command or subcommand fails), and every option it
names must be an option of that command. Notation the docs use is understood:
``down|up`` and ``status/sync`` are alternatives, ``[--cluster NAME]`` an optional
part, ``...`` more of the same.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from meshxl.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_INLINE = re.compile(r"`(meshxl [^`]+)`")
_STOP = {"|", ">", "&&", ";", "||", "<", "2>&1"}


def commands(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, command line) of every meshxl command shown in ``path``."""
    fenced = False
    pending: tuple[int, str] | None = None
    paragraph: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```") or not line.strip():
            yield from _inline(paragraph)
            paragraph = []
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            text = line.strip()
            if pending is not None:
                start, head = pending
                text = f"{head} {text}"
                number = start
                pending = None
            elif text.startswith("$ "):
                text = text[2:]
            if not text.startswith("meshxl "):
                continue
            if text.endswith("\\"):
                pending = (number, text[:-1].strip())
                continue
            yield number, text
        elif line.strip():
            paragraph.append((number, line.strip()))
    yield from _inline(paragraph)


def _inline(paragraph: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """The inline commands of a paragraph's lines, read as Markdown reads them: joined,
    so a command that rewrapping split over two lines is still found (at its first)."""
    text, starts = "", []
    for number, line in paragraph:
        starts.append((len(text), number))
        text += line + " "
    for match in _INLINE.finditer(text):
        yield max(n for at, n in starts if at <= match.start()), match.group(1).strip()


def words(command: str) -> list[str]:
    """The command's words, up to a comment or a shell operator."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:
        tokens = command.split()
    out: list[str] = []
    depth = 0  # inside <( ... ) or $( ... ): another command's output as an argument
    for token in tokens:
        if depth:
            depth += token.count("(") - token.count(")")
            continue
        if token in _STOP:
            break
        if token.startswith(("<(", "$(")):
            out.append("FILE")
            depth = token.count("(") - token.count(")")
            continue
        out.append(token)
    return out[1:]  # without "meshxl"


def resolve(tokens: list[str]) -> tuple[list[click.Command], list[str], str | None]:
    """The commands ``tokens`` name (several where the docs give alternatives), the
    words after them, and an error (None: every name resolved)."""
    frontier: list[click.Command] = [main]
    rest = list(tokens)
    while rest and any(isinstance(c, click.Group) for c in frontier):
        word = rest[0]
        if word.startswith("-") or word in ("...", "…") or word.isupper():
            break
        names = [n for n in re.split(r"[|/]", word.strip("[]")) if n]
        found: list[click.Command] = []
        for command in frontier:
            if not isinstance(command, click.Group):
                continue
            for name in names:
                sub = command.commands.get(name)
                if sub is None:
                    return frontier, rest, (f"{command.name} has no command {name!r} "
                                            f"(it has: {', '.join(sorted(command.commands))})")
                found.append(sub)
        frontier = found
        rest = rest[1:]
    return frontier, rest, None


def options_of(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


CASES = [(path.relative_to(ROOT).as_posix(), number, command)
         for path in DOCS for number, command in commands(path)]


def test_the_docs_show_commands() -> None:
    assert len(CASES) > 60  # the scan itself works
    assert any(c[2].startswith("meshxl member down") for c in CASES)


@pytest.mark.parametrize(("doc", "line", "command"), CASES,
                         ids=[f"{d}:{n}" for d, n, _ in CASES])
def test_every_documented_command_exists(doc: str, line: int, command: str) -> None:
    found, rest, error = resolve(words(command))
    assert error is None, f"{doc}:{line}: `{command}`: {error}"
    if all(isinstance(c, click.Group) for c in found):
        # A group named alone ("`meshxl istio`") is fine; with more words, they must
        # have named one of its commands.
        assert not rest or rest[0] in ("...", "…"), \
            f"{doc}:{line}: `{command}`: {rest[0]!r} is not a command of meshxl " \
            f"{found[0].name}"
        return
    for word in rest:
        option = word.strip("[]").split("=", 1)[0]
        if not option.startswith("-") or option in ("-", "--"):
            continue
        for command_obj in found:
            assert option in options_of(command_obj), \
                f"{doc}:{line}: `{command}`: meshxl {command_obj.name} has no option " \
                f"{option} (it has: {', '.join(sorted(options_of(command_obj)))})"


def test_the_check_catches_a_wrong_command() -> None:
    assert resolve(words("meshxl model apply m.yaml"))[2] is not None
    assert resolve(words("meshxl apply m.yaml --etcd URL"))[2] is None
    found, rest, _ = resolve(words("meshxl member down|up C M [--reason TEXT]"))
    assert [c.name for c in found] == ["down", "up"] and rest[0] == "C"
    assert "--nope" not in options_of(found[0])


def test_a_command_that_rewrapping_split_is_still_read(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("Grant it with `meshxl etcd\ngrant --tenant t1` first.\n\n"
                   "Then `meshxl status`.\n```sh\nmeshxl apply \\\n  m.yaml\n```\n")
    assert list(commands(doc)) == [(1, "meshxl etcd grant --tenant t1"),
                                   (4, "meshxl status"), (6, "meshxl apply m.yaml")]
