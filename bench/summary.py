"""One picture of every target against what was measured: ``bench/results/summary.png``.

Run: ``.venv/bin/python bench/summary.py`` (``make bench`` runs it last).

Reads the ``verdicts`` of every ``bench/results/*.json`` and draws, per target, the
measured value as a share of its target (log scale, 1 = on target): a bar left of the
line meets an "at most" target, right of it an "at least" one. Also prints the table.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from benchlib import RESULTS_DIR

OUT = RESULTS_DIR / "summary.png"


def load(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every verdict of every results file, with the benchmark's name and run facts."""
    rows = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for v in data.get("verdicts", []):
            rows.append({**v, "benchmark": data.get("benchmark", path.stem),
                         "quick": bool(data.get("quick")),
                         "load": (data.get("env") or {}).get("loadavg_at_start")})
    return rows


def _score(row: dict[str, Any]) -> float | None:
    """How far from the target, as measured/target for "at most" (target/measured for
    "at least"): below 1 is met. A zero target counts 0 as met and anything else as 10."""
    measured, target = row["measured"], row["target"]
    if measured is None:
        return None
    if target == 0:
        return 0.1 if measured == 0 else 10.0
    if row["at_most"]:
        return max(measured, 1e-9) / target
    return target / max(measured, 1e-9)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def draw(rows: list[dict[str, Any]], out: Path = OUT) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 1.2 + 0.55 * max(1, len(rows))
    fig, ax = plt.subplots(figsize=(13, height))
    labels, scores, colors = [], [], []
    for row in rows:
        score = _score(row)
        quick = " (quick)" if row["quick"] else ""
        labels.append(f"{row['name']}{quick}")
        scores.append(score if score is not None else 1.0)
        colors.append({True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}[row["met"]])
    y = list(range(len(rows)))[::-1]
    left = 0.05
    ax.barh(y, [s - left for s in scores], left=left, color=colors, height=0.6)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(left, max(30.0, max(scores) * 8 if scores else 30.0))
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    for yi, row, score in zip(y, rows, scores, strict=True):
        sign = "<=" if row["at_most"] else ">="
        text = (f"{_fmt(row['measured'], row['unit'])}  (target {sign} "
                f"{_fmt(row['target'], row['unit'])})")
        ax.text(max(score, left) * 1.08, yi, text, va="center", fontsize=8)
    ax.set_xlabel("measured / target (at most), target / measured (at least): "
                  "left of the line = target met")
    loads = [r["load"][0] for r in rows if r.get("load")]
    met = sum(1 for r in rows if r["met"])
    ax.set_title(f"meshxl benchmarks: {met} of {len(rows)} targets met"
                 + (f"  (1-minute load average at each start: {min(loads):.1f} to "
                    f"{max(loads):.1f} on {os.cpu_count()} cores)" if loads else ""),
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    rows = load()
    if not rows:
        print(f"no verdicts in {RESULTS_DIR}/*.json: run the benchmarks first")
        return 1
    print(f"\n== all targets ({len(rows)})")
    for row in rows:
        sign = "<=" if row["at_most"] else ">="
        verdict = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[row["met"]]
        quick = " [quick]" if row["quick"] else ""
        print(f"  {row['name']:<60} {_fmt(row['measured'], row['unit']):>12}  target {sign} "
              f"{_fmt(row['target'], row['unit']):<10} {verdict}{quick}")
    path = draw(rows)
    met = sum(1 for r in rows if r["met"])
    print(f"  {met} of {len(rows)} met; picture: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
