"""Build the worker image from the Containerfile with podman (or docker), timed, and print its size.

``make image`` calls this; ``python scripts/build_image.py --help`` lists the options. What it adds to a plain
``podman build``:

- this machine's pip settings as build secrets: the index URLs, trusted hosts, timeout and CA bundle that
  ``pip config list`` (files and ``PIP_*`` variables) reports here, written to ``build/pip/pip.conf`` with the CA
  copied beside it, passed as ``--secret id=pipconf`` and ``--secret id=pipca``: pip inside the build reaches the
  same index as pip outside it, and neither file is stored in a layer. ``file://`` locations (folders of this
  machine) are left out: the build cannot see them;
- with podman, ``CONTAINERS_CONF=build/containers.conf`` (scripts/containers-conf.sh: runtime and ulimits that
  work on a nested container host) unless CONTAINERS_CONF is set already;
- one line at the end: ``image: TAG (DEVICE on BASE): SIZE MB, built in N s``.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = REPO_ROOT / "build"
PIP_SECRET_DIR = BUILD_DIR / "pip"
SECRET_CA_PATH = "/run/secrets/pipca"
KEPT_OPTIONS = ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries", "proxy")


def pip_settings() -> dict[str, str]:
    """``pip config list`` as option -> value, ``PIP_*`` variables over files (pip's own order)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in listed.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        section, _, option = key.rpartition(".")
        value = str(ast.literal_eval(raw)) if raw[:1] in "'\"" else raw
        if section == ":env:":
            env[option] = value
        elif section in ("global", "install"):
            files[option] = value
    return files | env


def write_pip_secrets(settings: dict[str, str]) -> tuple[Path, Path | None]:
    """``build/pip/pip.conf`` (and the CA bundle it names, copied) for the build; their paths."""
    PIP_SECRET_DIR.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by scripts/build_image.py from `pip config list`; passed to the build as a secret.", "[global]"]
    for option in KEPT_OPTIONS:
        if option not in settings:
            continue
        kept = [v for v in settings[option].split() if not v.startswith("file:") and not v.startswith("/")]
        if kept:
            lines.append(f"{option} = {' '.join(kept)}")
    ca: Path | None = None
    cert = settings.get("cert")
    if cert and Path(cert).is_file():
        ca = PIP_SECRET_DIR / "ca.pem"
        shutil.copyfile(cert, ca)
        lines.append(f"cert = {SECRET_CA_PATH}")
    conf = PIP_SECRET_DIR / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf, ca


def engine_path(name: str | None) -> str:
    for candidate in [name] if name else ["podman", "docker"]:
        found = shutil.which(candidate)
        if found:
            return found
    raise SystemExit(
        "image: neither podman nor docker is installed; on Debian: "
        "apt-get install -y podman buildah crun runc fuse-overlayfs debootstrap"
    )


def image_exists(engine: str, image: str) -> bool:
    return subprocess.run([engine, "image", "inspect", image], capture_output=True, check=False).returncode == 0


def image_size_mb(engine: str, image: str) -> int:
    size = subprocess.run(
        [engine, "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True, check=True
    ).stdout
    return int(size.strip()) // 1_000_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the qinfer worker image (Containerfile), timed, with its size.")
    parser.add_argument("--tag", required=True, help="image name:tag to build, e.g. qinfer:0.1.0-cpu")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="ONNX Runtime build (default cuda)")
    parser.add_argument("--base-image", default="", help="BASE_IMAGE build arg (default: the Containerfile's)")
    parser.add_argument("--model-source", choices=("context", "none"), default="context", help="bake the model or not")
    parser.add_argument("--version", default="", help="the project's version, for the labels")
    parser.add_argument("--engine", default=None, help="podman or docker (default: podman, else docker)")
    args = parser.parse_args(argv)

    engine = engine_path(args.engine)
    env = dict(os.environ)
    if Path(engine).name == "podman" and "CONTAINERS_CONF" not in env:
        engine_conf = subprocess.run(
            [str(REPO_ROOT / "scripts" / "containers-conf.sh")], capture_output=True, text=True, check=True
        ).stdout.strip()
        env["CONTAINERS_CONF"] = str(REPO_ROOT / engine_conf)
    if args.base_image and args.base_image.startswith("localhost/") and not image_exists(engine, args.base_image):
        print(f"image: no base image {args.base_image}; run `make base-image` first (scripts/base-image.sh)")
        return 1
    if args.model_source == "context":
        model = REPO_ROOT / "models" / "all-MiniLM-L6-v2"
        if not (model / "model.onnx").is_file():
            print("image: models/all-MiniLM-L6-v2 is missing; run `make model` (or pass MODEL_SOURCE=none)")
            return 1
        if not model.resolve().is_relative_to(REPO_ROOT.resolve()):
            print(
                f"image: models/all-MiniLM-L6-v2 is a link to {model.resolve()}, outside the build context, which "
                "the builder does not follow; copy it in instead (rm models && mkdir models && "
                f"cp -r {model.resolve()} models/)"
            )
            return 1

    conf, ca = write_pip_secrets(pip_settings())
    command = [engine, "build", "-f", "Containerfile", "-t", args.tag, "--build-arg", f"DEVICE={args.device}"]
    command += ["--build-arg", f"MODEL_SOURCE={args.model_source}", "--secret", f"id=pipconf,src={conf}"]
    if ca is not None:
        command += ["--secret", f"id=pipca,src={ca}"]
    if args.base_image:
        command += ["--build-arg", f"BASE_IMAGE={args.base_image}"]
    if args.version:
        command += ["--build-arg", f"VERSION={args.version}"]
    print(f"image: building {args.tag} (DEVICE={args.device}, BASE_IMAGE={args.base_image or 'default'}) with {engine}")
    started = time.monotonic()
    built = subprocess.run([*command, str(REPO_ROOT)], env=env, check=False)
    seconds = time.monotonic() - started
    if built.returncode != 0:
        print(f"image: {Path(engine).name} build failed after {seconds:.0f} s (exit {built.returncode})")
        return built.returncode
    base = args.base_image or "the default base"
    size = image_size_mb(engine, args.tag)
    print(f"image: {args.tag} ({args.device} on {base}): {size} MB, built in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
