"""Generate the chart's README (``charts/qinfer/README.md``): every value with its type, default and meaning.

The meaning of a value is its ``# --`` comment in values.yaml (helm-docs style; the lines that follow it up to
the key continue it), else its description in values.schema.json; its type (and choices) comes from the schema,
its default from values.yaml itself. A plain comment block right above a key (no blank line between) is a note
on that group and is printed with its section. Edit values.yaml and values.schema.json, never the README:
``make chart-docs`` rewrites it, and the chart tests (tests/chart/test_chart_readme.py) fail while it is stale
or while a value has no description.

Usage: python scripts/chart_readme.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHART_DIR = Path(__file__).resolve().parents[1] / "charts" / "qinfer"
OUTPUT = CHART_DIR / "README.md"
KEY_LINE = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):")
MARKER = re.compile(r"^# --(\s|$)")
"""A helm-docs comment; ``# --set-string ...`` is a plain comment that mentions a flag."""


class ReadmeError(Exception):
    """Raised when a value cannot be documented: no description, or no type in the schema."""


@dataclass
class Commented:
    """What values.yaml says about its keys: each key path's ``# --`` text and the plain notes above keys."""

    order: list[tuple[str, ...]] = field(default_factory=list)
    """Every key path, in file order."""
    docs: dict[tuple[str, ...], str] = field(default_factory=dict)
    notes: dict[tuple[str, ...], str] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """One value of the chart as the README lists it."""

    key: str
    type: str
    default: str
    description: str


def read_comments(text: str) -> Commented:
    """The key paths of a values.yaml and the comments on them, from its lines (list items belong to their key)."""
    found = Commented()
    stack: list[tuple[int, str]] = []
    doc: list[str] | None = None
    note: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            doc, note = None, []  # a blank line ends a comment that belongs to no key
            continue
        if MARKER.match(stripped):
            doc = [stripped.removeprefix("# --").strip()]
            continue
        if stripped.startswith("#"):
            (doc if doc is not None else note).append(stripped.removeprefix("#").strip())
            continue
        match = KEY_LINE.match(line)
        if match is None:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        path = tuple(name for _, name in stack)
        found.order.append(path)
        if doc is not None:
            found.docs[path] = " ".join(part for part in doc if part)
        if note:
            found.notes[path] = " ".join(part for part in note if part)
        doc, note = None, []
    return found


def schema_at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = schema
    for name in path:
        node = (node or {}).get("properties", {}).get(name)
        if node is None:
            return None
    return node


def _types(node: dict[str, Any]) -> list[str]:
    declared = node.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [str(t) for t in declared]
    options = node.get("oneOf") or node.get("anyOf") or []
    return [t for option in options for t in _types(option) if t]


def type_of(node: dict[str, Any] | None, key: str) -> str:
    """The schema's type of a value (``integer or string``) and its choices, if it has any."""
    if node is None:
        raise ReadmeError(f"{key} is not in values.schema.json: describe it there (type and description)")
    types = list(dict.fromkeys(_types(node)))
    if not types:
        raise ReadmeError(f"{key} has no type in values.schema.json")
    text = " or ".join(types)
    choices = node.get("enum") or [c for option in node.get("oneOf", []) for c in option.get("enum", [])]
    if choices:
        text += ": " + ", ".join(f"`{json.dumps(c)}`" if not isinstance(c, str) else f"`{c}`" for c in choices)
    return text


def _dig(values: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        values = values[name]
    return values


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    """Comment text for Markdown: ``<`` and ``>`` outside code spans escaped, so ``<name>`` is not read as HTML."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def rows(values_text: str, schema: dict[str, Any]) -> tuple[list[Row], Commented]:
    """One row per documented key of values.yaml (a documented map is one row: its children are its default)."""
    commented = read_comments(values_text)
    values = yaml.safe_load(values_text)
    documented = set(commented.docs)
    parents = {path[:i] for path in commented.order for i in range(1, len(path))}
    found: list[Row] = []
    for path in commented.order:
        key = ".".join(path)
        if any(path[:i] in documented for i in range(1, len(path))):
            continue  # inside a documented map: part of that row's default
        node = schema_at(schema, path)
        if path not in documented and path in parents:
            continue  # a group: its keys are the rows
        description = commented.docs.get(path) or (node or {}).get("description", "")
        if not description:
            raise ReadmeError(f"{key} has no description: give it a `# --` comment in values.yaml")
        default = json.dumps(_dig(values, path), ensure_ascii=False, separators=(", ", ": "))
        found.append(Row(key, type_of(node, key), default, description))
    return found, commented


def _table(section: list[Row]) -> list[str]:
    lines = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for row in section:
        lines.append(f"| `{row.key}` | {_cell(row.type)} | `{_cell(row.default)}` | {_cell(_prose(row.description))} |")
    return lines


def render(chart_dir: Path = CHART_DIR) -> str:
    """The README for the chart in ``chart_dir``."""
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    schema = json.loads((chart_dir / "values.schema.json").read_text())
    found, commented = rows((chart_dir / "values.yaml").read_text(), schema)
    general = [row for row in found if "." not in row.key]
    groups: dict[str, list[Row]] = {}
    for row in found:
        if "." in row.key:
            groups.setdefault(row.key.split(".")[0], []).append(row)
    name = chart["name"]
    out = [
        f"# {name} Helm chart",
        "",
        "<!-- Generated by scripts/chart_readme.py from values.yaml and values.schema.json: edit those, then run",
        "     `make chart-docs`. The chart tests fail while this file is stale. -->",
        "",
        " ".join(str(chart["description"]).split()),
        "",
        f"Chart version {chart['version']}, app version {chart['appVersion']}, Kubernetes {chart['kubeVersion']}. "
        "Prerequisites, an install per environment, TLS, canaries and scaling: [docs/deploy.md](../../docs/deploy.md).",
        "",
        "## Install",
        "",
        "Broker credentials are passed at install time (or name an existing Secret with `broker.existingSecret`),",
        "never written to a values file:",
        "",
        "```sh",
        f"helm install {name} charts/{name} -n {name} --create-namespace \\",
        f"  -f charts/{name}/values-prod.yaml \\",
        "  --set image.repository=registry.example.com/ml/qinfer \\",
        "  --set-string broker.auth.amqpUrl='amqps://qinfer-worker:PASSWORD@rabbitmq.rabbitmq.svc:5671/' \\",
        "  --set-string broker.auth.kedaUsername=keda \\",
        "  --set-string broker.auth.kedaPassword='PASSWORD'",
        "```",
        "",
        "## Test the release",
        "",
        "```sh",
        f"helm test {name} -n {name} --logs",
        "```",
        "",
        "The test Pod (restricted like the workers, no GPU) runs the image's client once, `producer send`, against the",
        "queue the release's workers consume, with the broker URL and TLS files the workers read. It prints one line",
        "and exits 0 on a reply with outputs from the release's model and version; otherwise it exits 1 and its line",
        "says why: an error reply (its code and message), no outputs, another model or version answering, no reply",
        "within `tests.timeoutS`, no such queue, or a broker it cannot reach. For a model other than the default text",
        "model set `tests.request` to a request it accepts. The Pod stays until the next `helm test`, for its logs.",
        "",
        "## Values",
        "",
    ]
    sections: list[tuple[str, str, list[Row]]] = [("General", "", general)]
    for top, section in groups.items():
        intro = [commented.notes.get((top,)) or (schema_at(schema, (top,)) or {}).get("description", "")]
        for path, note in commented.notes.items():
            if path[0] == top and len(path) > 1:
                intro.append(f"`{'.'.join(path)}`: {note}")
        sections.append((f"`{top}`", "\n\n".join(part.rstrip(".") + "." for part in intro if part), section))
    for title, intro, section in sections:
        out += [f"### {title}", ""]
        if intro:
            out += [_prose(intro), ""]
        out += [*_table(section), ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the chart's README is not what this generates")
    args = parser.parse_args()
    try:
        text = render()
    except ReadmeError as e:
        print(f"chart_readme: {e}", file=sys.stderr)
        return 1
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run make chart-docs (python scripts/chart_readme.py)", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
