"""What one run of streams says, from what their clients saw (``bench/streams.py``): pure
code over the logs of every stream, whichever client wrote them (meshxl's Python
clients, the Socket.IO peer's Node client).

A stream's log: each message the client sent (its number, the amount ``n``, the send
time) and each answer received (the number of the message it answers, ``n``, the tally
``total`` after it, the member that answered, the arrival time, and which of the
stream's connections carried it). Times are Unix seconds. Every message is answered
once by a tally (``meshxl.demo.tally``), so:

* **lost**: messages never answered while a later one of the same stream was (a gap);
  those sent after a stream's last answer are **unanswered** when the run stopped
  (still in flight: a backlog, or a stream that stalled), counted apart;
* **duplicated**: answers received more than once, and messages *applied* more than
  once: the tally after a message must be the sum of the amounts sent up to it, so a
  tally that jumps above that sum applied a message again (it stays above: one jump,
  one duplicate), one that drops below lost a message's effect (counted as lost);
* **reordered**: answers that arrive after the answer of a later message;
* **resume time**: from the kill (or drain) to the stream's first answer on the
  connection that carried it from then on to the end of the phase (replayed answers
  included: the first message on the resumed stream). A stream whose first new
  connection broke again had not resumed yet: under a backlog, streams broke two or
  three times after one kill, and their first answer on the first new connection said
  they were back seconds before they were;
* **latency**: from a message's send to its answer's arrival (first answers of
  messages sent within a window), and the **rate**: answers a second in the window.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchlib import summary_ms

Sent = tuple[int, int, float]
"""(seq, n, sent at)"""
Answer = tuple[int, int, "int | None", "str | None", float, int]
"""(seq, n, total, member, arrived at, connection number from 1)"""


@dataclass
class StreamLog:
    """One stream as its client saw it."""

    id: str
    sent: list[Sent] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Errors raised to the application (an exception from send or receive)."""
    resumes: list[float] = field(default_factory=list)
    """What the client library measured: seconds from a break to the next ``ready``."""
    recovered: list[bool] = field(default_factory=list)
    """Socket.IO: per reconnection, whether its session was recovered."""

    @classmethod
    def of(cls, doc: dict[str, Any]) -> StreamLog:
        """From the Node client's JSON (times in ms)."""
        return cls(
            id=str(doc["id"]),
            sent=[(int(s), int(n), t / 1000) for s, n, t in doc["sent"]],
            answers=[(int(s), int(n), None if total is None else int(total), member,
                      t / 1000, int(c)) for s, n, total, member, t, c in doc["answers"]],
            errors=[],
            recovered=[bool(r) for _, r in doc.get("connects", [])[1:]])


@dataclass
class Checked:
    """One stream's verdict (:func:`check`)."""

    lost: int = 0
    unanswered: int = 0
    answered_twice: int = 0
    applied_twice: int = 0
    effects_lost: int = 0
    reordered: int = 0

    @property
    def duplicated(self) -> int:
        return self.answered_twice + self.applied_twice


def check(log: StreamLog) -> Checked:
    """Lost, duplicated and reordered messages of one stream (module docstring)."""
    out = Checked()
    amounts = {seq: n for seq, n, _ in log.sent}
    first: dict[int, Answer] = {}
    highest = 0
    for answer in log.answers:
        seq = answer[0]
        if seq in first:
            out.answered_twice += 1
            continue
        first[seq] = answer
        if seq < highest:
            out.reordered += 1
        highest = max(highest, seq)
    out.lost = sum(1 for seq in amounts if seq not in first and seq < highest)
    out.unanswered = sum(1 for seq in amounts if seq > highest)
    running = 0
    deviation = 0
    for seq in sorted(amounts):
        running += amounts[seq]
        answer = first.get(seq)
        if answer is None or answer[2] is None:
            continue
        now = answer[2] - running
        if now > deviation:
            out.applied_twice += 1
        elif now < deviation:
            out.effects_lost += 1
        deviation = now
    return out


def latencies_ms(logs: Sequence[StreamLog], since: float, until: float) -> list[float]:
    """Send -> answer of the messages sent within [since, until) (first answers)."""
    out: list[float] = []
    for log in logs:
        arrived: dict[int, float] = {}
        for answer in log.answers:
            arrived.setdefault(answer[0], answer[4])
        out += [(arrived[seq] - t) * 1000 for seq, _, t in log.sent
                if since <= t < until and seq in arrived]
    return out


def rates(logs: Sequence[StreamLog], since: float, until: float) -> dict[str, float]:
    """Messages a second in [since, until): sent by the clients, answers received."""
    span = max(until - since, 1e-9)
    sent = sum(1 for log in logs for _, _, t in log.sent if since <= t < until)
    answered = sum(1 for log in logs for a in log.answers if since <= a[4] < until)
    return {"sent_per_s": round(sent / span, 1), "answers_per_s": round(answered / span, 1)}


def resume_times_ms(logs: Sequence[StreamLog], at: float,
                    member: str | None = None) -> tuple[list[float], list[str]]:
    """Per stream served at ``at`` (by ``member``, if given): ``at`` -> its first answer
    on a later connection that carried it to the end (the module docstring); and the
    streams that got none."""
    times: list[float] = []
    unresumed: list[str] = []
    for log in logs:
        arrivals = [a[4] for a in log.answers]
        k = bisect.bisect_left(arrivals, at)
        before = log.answers[:k]
        if member is not None and (not before or before[-1][3] != member):
            continue
        connection = before[-1][5] if before else 1
        last = log.answers[-1][5] if log.answers else connection
        later = next((a for a in log.answers[k:] if a[5] > connection and a[5] >= last),
                     None)
        if later is None:
            unresumed.append(log.id)
        else:
            times.append((later[4] - at) * 1000)
    return times, unresumed


def slowest(logs: Sequence[StreamLog], at: float, member: str | None,
            count: int = 3) -> list[dict[str, Any]]:
    """The ``count`` streams slowest to resume, as they went (for a diagnosis): answers
    around ``at`` as (ms after it, connection, member), and the library's resumes."""
    timed = []
    for log in logs:
        times, unresumed = resume_times_ms([log], at, member)
        if times or unresumed:
            timed.append((times[0] if times else float("inf"), log))
    timed.sort(key=lambda x: -x[0])
    out = []
    for ms, log in timed[:count]:
        around = [(round((a[4] - at) * 1000), a[5], a[3]) for a in log.answers
                  if -500 < (a[4] - at) * 1000][:6]
        out.append({"id": log.id, "resume_ms": None if ms == float("inf") else round(ms, 1),
                    "answers_after": around, "library_resumes_ms":
                    [round(r * 1000) for r in log.resumes], "errors": log.errors[:2]})
    return out


def report(logs: Sequence[StreamLog], *, steady: tuple[float, float],
           event: float | None = None, member: str | None = None) -> dict[str, Any]:
    """Everything :mod:`bench.streams` reports of one phase's streams."""
    checked = [check(log) for log in logs]
    out: dict[str, Any] = {
        "streams": len(logs),
        "messages_sent": sum(len(log.sent) for log in logs),
        "answers": sum(len(log.answers) for log in logs),
        "errors": sum(len(log.errors) for log in logs),
        "error_kinds": _kinds([e for log in logs for e in log.errors]),
        "lost": sum(c.lost + c.effects_lost for c in checked),
        "unanswered": sum(c.unanswered for c in checked),
        "duplicated": sum(c.duplicated for c in checked),
        "answered_twice": sum(c.answered_twice for c in checked),
        "applied_twice": sum(c.applied_twice for c in checked),
        "reordered": sum(c.reordered for c in checked),
        "steady_s": round(steady[1] - steady[0], 2),
        "latency_ms": summary_ms(latencies_ms(logs, *steady)),
        **rates(logs, *steady),
    }
    if event is not None:
        times, unresumed = resume_times_ms(logs, event, member)
        out["resume_ms"] = summary_ms(times)
        out["unresumed"] = len(unresumed)
        out["unresumed_examples"] = unresumed[:5]
        out["slowest"] = slowest(logs, event, member)
        library = [r * 1000 for log in logs for r in log.resumes]
        out["break_to_ready_ms"] = summary_ms(library)
        recovered = [r for log in logs for r in log.recovered]
        if recovered:
            out["reconnections"] = len(recovered)
            out["recovered"] = sum(recovered)
    return out


def _kinds(errors: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in errors:
        key = " ".join(e.split())[:80]
        out[key] = out.get(key, 0) + 1
    return out
