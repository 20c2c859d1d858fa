"""The README documents every worker setting and every error code, so docs cannot drift silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.wire.protocol import ErrorCode
from worker.settings import SETTINGS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("spec", SETTINGS, ids=lambda s: s.env)
def test_readme_documents_every_setting(spec: object) -> None:
    env, flag = spec.env, spec.flag  # type: ignore[attr-defined]
    assert f"| `{env}` |" in README, f"add {env} to the README's settings table"
    assert flag.removeprefix("--") in README


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_readme_documents_every_error_code(code: ErrorCode) -> None:
    assert f"| `{code}` |" in README, f"add {code} to the README's error code table"
