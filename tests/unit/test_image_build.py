"""scripts/build_image.py: the pip settings handed to the build as secrets, and the one-line refusal without podman."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build_image() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_image", ROOT / "scripts" / "build_image.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pip_secrets_keep_network_indexes_and_the_ca_and_leave_local_folders_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = build_image()
    monkeypatch.setattr(module, "PIP_SECRET_DIR", tmp_path / "pip")
    ca = tmp_path / "machine-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = {
        "index-url": "https://proxy.example/simple",
        "extra-index-url": "file:///opt/pypi/simple https://mirror.example/simple",
        "find-links": "/opt/wheels",
        "constraint": "/etc/xdg/pip/constraints.txt",
        "cert": str(ca),
        "default-timeout": "180",
    }
    conf, copied = module.write_pip_secrets(settings)
    text = conf.read_text()
    assert "index-url = https://proxy.example/simple" in text
    assert "extra-index-url = https://mirror.example/simple" in text
    assert "/opt/" not in text, "folders of this machine are not visible to the build"
    assert "constraint" not in text
    assert f"cert = {module.SECRET_CA_PATH}" in text
    assert copied is not None
    assert copied.read_text() == ca.read_text()


def test_no_cert_configured_means_no_ca_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = build_image()
    monkeypatch.setattr(module, "PIP_SECRET_DIR", tmp_path / "pip")
    conf, copied = module.write_pip_secrets({})
    assert copied is None
    assert "cert" not in conf.read_text()


def test_without_podman_or_docker_it_says_what_to_install_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_image.py"), "--tag", "qinfer:test", "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "apt-get install -y podman" in lines[0]
