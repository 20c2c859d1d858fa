"""Static checks of the worker image's Containerfile, parsed instruction by instruction (no image is built)."""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.chart.helpers import CHART_DIR, REPO_ROOT
from worker.settings import DEFAULT_MODEL_PATH

CONTAINERFILE = REPO_ROOT / "Containerfile"
CONTAINERIGNORE = REPO_ROOT / ".containerignore"
OFFICIAL_PYTHON = re.compile(r"^docker\.io/library/python:3\.1[1-9]\.?\d*-slim-[a-z]+(@sha256:[0-9a-f]{64})?$")


@dataclass
class Stage:
    """One FROM and the instructions under it, ARGs substituted with their defaults."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [value for kind, value in self.instructions if kind == instruction]


def parsed() -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(CONTAINERFILE.read_bytes()))


def stages() -> list[Stage]:
    parser = parsed()
    bases = iter(parser.parent_images)  # the FROM images, ARG defaults substituted, in order
    found: list[Stage] = []
    for instruction in parser.structure:
        kind, value = instruction["instruction"], instruction["value"]
        if kind == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(found))
            found.append(Stage(name, next(bases)))
        elif kind != "COMMENT" and found:
            found[-1].instructions.append((kind, value))
    return found


def stage(name: str) -> Stage:
    (found,) = (s for s in stages() if s.name == name)
    return found


def final_stage() -> Stage:
    return stages()[-1]


def root_image(name: str) -> str:
    """The external image a stage finally builds on, following stage-on-stage bases."""
    by_name = {s.name: s for s in stages()}
    while name in by_name:
        name = by_name[name].base
    return name


def copy_sources(value: str) -> list[str]:
    """The source paths of a COPY/ADD without --from (exec or shell form); empty for --from copies."""
    words = json.loads(value) if value.lstrip().startswith("[") else shlex.split(value)
    if any(word.startswith("--from") for word in words):
        return []
    operands = [word for word in words if not word.startswith("--")]
    return operands[:-1]


def build_args() -> dict[str, str]:
    return parsed().args  # type: ignore[no-any-return]


def project_version() -> str:
    return str(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_the_build_is_multi_stage_and_the_runtime_is_the_last_stage() -> None:
    names = [s.name for s in stages()]
    assert names[-1] == "runtime"
    assert {"build", "runtime"} <= set(names)


def test_every_external_base_image_is_pinned() -> None:
    names = {s.name for s in stages()}
    for s in stages():
        if s.base in names or s.base == "scratch":
            continue
        image, _, digest = s.base.partition("@")
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert digest.startswith("sha256:") or (tag and tag != "latest" and re.search(r"\d+\.\d+", tag)), (
            f"stage {s.name} builds on {s.base}: pin a versioned tag or a digest"
        )


def test_the_base_is_a_build_arg_defaulting_to_an_official_python_slim_image_by_full_tag() -> None:
    base = root_image(final_stage().name)
    assert base == build_args()["BASE_IMAGE"]
    assert OFFICIAL_PYTHON.match(base), base
    assert root_image("build") == base, "build and runtime share one base, so the venv runs in both"
    assert "nvidia/cuda" not in CONTAINERFILE.read_text().split("\nFROM", 1)[1], "CUDA comes from the wheels"


def test_the_python_of_the_base_is_checked_not_assumed() -> None:
    checks = stage("python-base").values("RUN")
    assert any("sys.version_info" in run and "(3, 11)" in run for run in checks), checks
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"


def test_the_image_runs_as_the_non_root_user_the_chart_expects() -> None:
    users = final_stage().values("USER")
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    assert int(uid) != 0
    security = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["podSecurityContext"]
    assert (int(uid), int(gid or uid)) == (security["runAsUser"], security["runAsGroup"])
    created = " ".join(final_stage().values("RUN"))
    assert f"--uid {uid}" in created, "the user is created in the image"


def test_the_build_time_smoke_test_is_the_gpu_check_on_the_installed_environment() -> None:
    runtime = final_stage()
    copies = [i for i, (kind, value) in enumerate(runtime.instructions) if kind == "COPY" and "/opt/venv" in value]
    smoke = [
        i
        for i, (kind, value) in enumerate(runtime.instructions)
        if kind == "RUN" and "python -m worker.gpu_check --libraries-only" in value
    ]
    assert smoke, "no RUN runs `python -m worker.gpu_check --libraries-only` (the check `make gpu-check` runs)"
    assert copies
    assert min(smoke) > max(copies), "the smoke test must run on the installed environment"
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "-m worker.gpu_check" in makefile, "make gpu-check runs the same check"


def test_dependencies_are_installed_before_the_sources_are_copied() -> None:
    build = stage("build")
    kinds = build.instructions
    first_install = next(i for i, (k, v) in enumerate(kinds) if k == "RUN" and "pip install" in v)
    copied_before = [copy_sources(v) for k, v in kinds[:first_install] if k == "COPY"]
    assert copied_before == [["pyproject.toml"]], copied_before
    sources = {"worker/", "producer/"}
    source_copies = [i for i, (k, v) in enumerate(kinds) if k == "COPY" and sources & set(copy_sources(v))]
    assert source_copies
    assert min(source_copies) > first_install


def test_device_selects_the_gpu_or_the_cpu_extra_and_pins_onnx_runtime() -> None:
    build = stage("build")
    runs = " ".join(build.values("RUN"))
    assert "'cuda': ('gpu', 'onnxruntime-gpu')" in runs
    assert "'cpu': ('cpu', 'onnxruntime')" in runs
    assert '"${DEVICE}" "${ONNXRUNTIME_VERSION}"' in runs
    assert build_args()["DEVICE"] == "cuda"
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("onnxruntime-gpu[cuda,cudnn]") for dep in extras["gpu"]), extras["gpu"]
    assert any(dep.startswith("nvidia-cublas") for dep in extras["gpu"]), "the cuda extra leaves cuBLAS out"
    assert any(dep.startswith("onnxruntime>") for dep in extras["cpu"])


def test_pip_settings_come_in_as_build_secrets_never_as_files_in_a_layer() -> None:
    for s in stages():
        for kind, value in s.instructions:
            if kind == "RUN" and "pip install" in value:
                assert "--mount=type=secret,id=pipconf" in value, value
                assert "--mount=type=secret,id=pipca" in value, value
                assert "PIP_CONFIG_FILE=/run/secrets/pipconf" in value, value
            if kind in ("COPY", "ADD", "ENV"):
                for baked in ("pip.conf", "PIP_CONFIG_FILE", "PIP_CERT"):
                    assert baked not in value, value


def test_the_runtime_stage_has_no_pip_cache_and_no_compiler() -> None:
    assert "PIP_NO_CACHE_DIR=1" in " ".join(stage("build").values("ENV"))
    runtime = " ".join(final_stage().values("RUN"))
    assert "apt-get install" not in runtime, "the runtime stage installs no packages (no compilers)"


def test_oci_labels_record_the_versions() -> None:
    labels = parsed().labels
    args = build_args()
    assert labels["org.opencontainers.image.version"] == project_version()
    assert labels["org.opencontainers.image.base.name"] == args["BASE_IMAGE"]
    assert labels["io.qinfer.onnxruntime.version"] == args["ONNXRUNTIME_VERSION"]
    assert labels["org.opencontainers.image.title"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def test_the_labels_come_last() -> None:
    kinds = [kind for kind, _ in final_stage().instructions]
    assert kinds[-1] == "LABEL"
    assert all(kind in ("ARG", "LABEL") for kind in kinds[kinds.index("CMD") + 1 :])


def test_the_image_runs_worker_run_as_the_chart_does() -> None:
    runtime = final_stage()
    assert json.loads(runtime.values("ENTRYPOINT")[-1]) == ["worker"]
    assert json.loads(runtime.values("CMD")[-1]) == ["run"]
    deployment = (CHART_DIR / "templates" / "deployment.yaml").read_text()
    assert 'args: ["run"]' in deployment


def test_the_image_model_path_is_the_charts_default() -> None:
    env = parsed().envs
    chart_model = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["model"]["path"]
    assert env["WORKER_MODEL"] == chart_model
    assert Path(chart_model).name == Path(DEFAULT_MODEL_PATH).name


def generated_by_make_model(source: str) -> bool:
    """True for the model folder `make model` writes (it is built, not committed)."""
    if source.rstrip("/") != DEFAULT_MODEL_PATH:
        return False
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^model:", makefile, re.MULTILINE), f"{source} comes from `make model`: the Makefile needs it"
    return True


def ignore_rules() -> list[tuple[re.Pattern[str], bool]]:
    rules = []
    for line in CONTAINERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rules.append((re.compile(f"^{regex}$"), keep))
    return rules


def sent_to_the_builder(path: str) -> bool:
    """Whether .containerignore lets ``path`` into the build context (last matching rule wins, as in Docker)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    sent = True
    for regex, keep in ignore_rules():
        if any(regex.match(prefix) for prefix in prefixes):
            sent = keep
    return sent


def tracked_files(source: str) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", source],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in listed.stdout.splitlines() if "__pycache__" not in line]


@pytest.mark.parametrize(
    "source",
    sorted({src for s in stages() for k, v in s.instructions if k in ("COPY", "ADD") for src in copy_sources(v)}),
)
def test_every_copy_source_exists_and_reaches_the_builder(source: str) -> None:
    if generated_by_make_model(source):
        assert sent_to_the_builder(source)
        return
    path = REPO_ROOT / source
    assert path.exists(), f"COPY {source}: no such file in the repository"
    files = tracked_files(source) if path.is_dir() else [source]
    assert files, f"COPY {source}: nothing in it"
    left_out = [file for file in files if not sent_to_the_builder(file)]
    assert not left_out, f".containerignore leaves out {left_out}"


def test_containerignore_keeps_the_virtual_environment_and_git_out() -> None:
    for path in (".venv/bin/python", ".git/config", "tests/conftest.py", "models/other/model.onnx"):
        assert not sent_to_the_builder(path), path


def test_make_image_builds_this_containerfile() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe: Any = re.search(r"^image:.*?(?=^\S|\Z)", makefile, re.MULTILINE | re.DOTALL)
    assert recipe, "the Makefile has no image target"
    assert "Containerfile" in recipe.group(0)
    assert "podman" in recipe.group(0)
    assert "docker" in recipe.group(0)
