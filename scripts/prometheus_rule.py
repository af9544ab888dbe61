#!/usr/bin/env python3
"""Write deploy/prometheus/prometheusrule.yaml from deploy/prometheus/meshxl-rules.yaml.

The plain rules file is the one to edit; the PrometheusRule (monitoring.coreos.com/v1,
for the Prometheus Operator) carries the same groups as its ``spec``:

    python3 scripts/prometheus_rule.py          # rewrite prometheusrule.yaml
    python3 scripts/prometheus_rule.py --check  # exit 1 when it is out of date

The tests run the check, so the two files cannot drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "meshxl-rules.yaml"
OUTPUT = ROOT / "deploy" / "prometheus" / "prometheusrule.yaml"

HEADER = """\
# meshxl's recording and alerting rules as a PrometheusRule for the Prometheus Operator.
# Generated from meshxl-rules.yaml by `python3 scripts/prometheus_rule.py`: edit that
# file, then run the script. The operator's Prometheus picks it up when its
# ruleSelector matches these labels (kube-prometheus-stack selects `release: NAME` by
# default: add that label, e.g. with kustomize). docs/metrics.md, "Alerts".
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (expressions) as literal blocks, as they are written by hand."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule object holding ``rules`` (a parsed rules file)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "meshxl",
            "labels": {"app.kubernetes.io/name": "meshxl",
                       "app.kubernetes.io/part-of": "meshxl"},
        },
        "spec": {"groups": rules["groups"]},
    }


def render(rules_text: str) -> str:
    body = yaml.dump(prometheus_rule(yaml.safe_load(rules_text)), Dumper=_Dumper,
                     sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def main(argv: list[str]) -> int:
    wanted = render(RULES.read_text())
    if argv == ["--check"]:
        if OUTPUT.read_text() != wanted:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date with "
                  f"{RULES.relative_to(ROOT)}: run python3 scripts/prometheus_rule.py",
                  file=sys.stderr)
            return 1
        return 0
    if argv:
        print("usage: prometheus_rule.py [--check]", file=sys.stderr)
        return 2
    OUTPUT.write_text(wanted)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
