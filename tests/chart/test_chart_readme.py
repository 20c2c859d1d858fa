"""The chart's README lists every value with its type, default and meaning, and is what scripts/chart_readme.py makes.

Edit values.yaml and values.schema.json, then ``make chart-docs``: the README is never edited by hand.
"""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest
import yaml

from scripts import chart_readme
from tests.chart.helpers import CHART_DIR

VALUES = (CHART_DIR / "values.yaml").read_text()


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART_DIR / "values.schema.json").read_text())
    return loaded


def leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in leaves(value, (*path, key))]
    return [path]


def test_the_shipped_readme_is_what_the_script_generates() -> None:
    shipped = (CHART_DIR / "README.md").read_text()
    assert shipped == chart_readme.render(), "charts/qinfer/README.md is stale: run make chart-docs"


def test_every_value_has_a_row_with_its_type_default_and_meaning() -> None:
    rows, _ = chart_readme.rows(VALUES, schema())
    keys = {tuple(row.key.split(".")) for row in rows}
    for leaf in leaves(yaml.safe_load(VALUES)):
        assert any(leaf[:i] in keys for i in range(1, len(leaf) + 1)), f"{'.'.join(leaf)} has no row"
    readme = (CHART_DIR / "README.md").read_text()
    for row in rows:
        assert row.type, row.key
        assert row.description, row.key
        value: Any = yaml.safe_load(VALUES)
        for name in row.key.split("."):
            value = value[name]
        assert json.loads(row.default) == value, row.key
        assert f"| `{row.key}` | " in readme


def test_the_helm_test_values_are_documented() -> None:
    rows = {row.key: row for row in chart_readme.rows(VALUES, schema())[0]}
    assert rows["tests.timeoutS"].default == "120"
    assert rows["tests.timeoutS"].type == "number"
    assert "helm test --timeout" in rows["tests.timeoutS"].description
    assert {"tests.enabled", "tests.request", "tests.resources"} <= rows.keys()


def test_a_value_without_a_description_fails_the_generation() -> None:
    undocumented = VALUES + "\nnewThing:\n  knob: 3\n"
    with pytest.raises(chart_readme.ReadmeError, match=r"newThing.knob has no description"):
        chart_readme.rows(undocumented, schema())


def test_a_value_missing_from_the_schema_fails_the_generation() -> None:
    with pytest.raises(chart_readme.ReadmeError, match=r"newThing is not in values.schema.json"):
        chart_readme.rows(VALUES + "\n# -- A new knob\nnewThing: 3\n", schema())


def test_a_flag_in_a_plain_comment_is_not_read_as_a_description() -> None:
    text = "group:\n  # Pass them with\n  # --set-string; never commit them.\n  knob: 1\n"
    commented = chart_readme.read_comments(text)
    assert ("group", "knob") not in commented.docs
    assert commented.notes[("group", "knob")] == "Pass them with --set-string; never commit them."


def test_helm_show_readme_prints_it() -> None:
    assert helm.show(str(CHART_DIR), output_format="readme").strip() == (CHART_DIR / "README.md").read_text().strip()
