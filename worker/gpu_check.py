"""``python -m worker.gpu_check``: can this environment run the model on CUDA, and does CUDA agree with the CPU?

Two parts:

1. **Libraries** (any machine, GPU or not): ONNX Runtime must have its CUDA provider, and every shared
   library that provider needs must resolve. The check lists what the provider libraries
   (``libonnxruntime_providers_shared.so`` and ``libonnxruntime_providers_cuda.so``; TensorRT's is left
   out, the worker does not use it) need, read from their ELF dynamic sections, and loads each one,
   recursively, after ``onnxruntime.preload_dlls()`` where the wheel has it (it loads CUDA and cuDNN
   from the ``nvidia-*`` wheels when those are installed; in the image they come from the CUDA base
   image instead). Driver libraries (``libcuda.so.1`` and the like) come with the NVIDIA driver on a
   GPU node, not with the image: they are listed, and required only where a GPU is present.
2. **Numbers** (only where a GPU answers): the default model, and its ``-opt`` and ``-fp16`` variants
   where they exist, on CUDA against FP32 on the CPU, row by row: cosine >= 0.999 for FP32 variants,
   >= 0.99 for FP16.

Exit status 0 when everything checked passed, 1 otherwise; the output says what is missing and why.
``make gpu-check`` runs it in a separate environment with the ``gpu`` extra; the image runs it with
``--libraries-only`` as its build-time smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import io
import mmap
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROVIDER_LIBRARIES = ("libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so")
DRIVER_PREFIXES = ("libcuda.so", "libnvidia-", "libnvcuvid.so")
"""Libraries the NVIDIA driver provides on a GPU node (the container runtime mounts them)."""
FP32_MIN_COSINE = 0.999
FP16_MIN_COSINE = 0.99
_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 15, 29
CUDNN_PARTS = ("graph", "ops", "cnn", "adv", "heuristic", "engines_precompiled", "engines_runtime_compiled")
"""cuDNN 9's sub-libraries, which ``libcudnn.so.9`` opens as it needs them."""


class ElfError(ValueError):
    """Raised when a file is not a 64-bit little-endian ELF shared object this check can read."""


# ---------------------------------------------------------------------------------------------
# ELF: what a shared library needs, and where it looks


@dataclasses.dataclass(frozen=True)
class Dynamic:
    """A shared library's dynamic section: the sonames it needs, and its RPATH/RUNPATH folders."""

    needed: list[str]
    search_dirs: list[str]


def read_dynamic(path: Path) -> Dynamic:
    """``DT_NEEDED`` (in order) and ``DT_RPATH``/``DT_RUNPATH`` (``$ORIGIN`` expanded) of a 64-bit LE ELF file.

    Raises:
        ElfError: when the file is not such an ELF file or its dynamic section cannot be read.
    """
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ElfError(f"{path} is not a 64-bit little-endian ELF file")
        (phoff,) = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        loads: list[tuple[int, int, int]] = []  # (vaddr, file size, file offset)
        dynamic: tuple[int, int] | None = None  # (file offset, size)
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
            if p_type == _PT_LOAD:
                loads.append((p_vaddr, p_filesz, p_offset))
            elif p_type == _PT_DYNAMIC:
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return Dynamic([], [])
        entries: list[tuple[int, int]] = []
        strtab_vaddr: int | None = None
        for at in range(dynamic[0], dynamic[0] + dynamic[1], 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == _DT_NULL:
                break
            if tag == _DT_STRTAB:
                strtab_vaddr = value
            elif tag in (_DT_NEEDED, _DT_RPATH, _DT_RUNPATH):
                entries.append((tag, value))
        if strtab_vaddr is None:
            raise ElfError(f"{path} has a dynamic section without a string table")
        strtab = next((off + strtab_vaddr - va for va, size, off in loads if va <= strtab_vaddr < va + size), None)
        if strtab is None:
            raise ElfError(f"{path}: the string table lies in no loaded segment")

        def string(offset: int) -> str:
            start = strtab + offset
            return bytes(data[start : data.find(b"\0", start)]).decode()

        origin = str(path.resolve().parent)
        needed = [string(v) for tag, v in entries if tag == _DT_NEEDED]
        dirs = [
            d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
            for tag, v in entries
            if tag != _DT_NEEDED
            for d in string(v).split(":")
            if d
        ]
        return Dynamic(needed, dirs)


def needed_libraries(path: Path) -> list[str]:
    """The sonames a shared library needs (``DT_NEEDED``), in order; see :func:`read_dynamic`."""
    return read_dynamic(path).needed


# ---------------------------------------------------------------------------------------------
# Resolving libraries in this process


def _loaded_paths() -> list[str]:
    """Files mapped into this process (Linux ``/proc/self/maps``)."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/self/maps").read_text().splitlines()
        return sorted({parts[-1] for line in lines if len(parts := line.split()) >= 6 and parts[-1].startswith("/")})
    return []


def _path_of(soname: str) -> str | None:
    for path in _loaded_paths():
        name = os.path.basename(path)
        if name == soname or name.startswith(soname + "."):
            return path
    return None


@dataclasses.dataclass(frozen=True)
class Library:
    """One library the provider set needs: where it resolved, or why it did not."""

    soname: str
    needed_by: str
    path: str | None
    error: str | None

    @property
    def driver(self) -> bool:
        """A driver library, or one that failed to load only because a driver library is absent."""
        if self.soname.startswith(DRIVER_PREFIXES):
            return True
        return self.error is not None and any(f"{p}" in self.error for p in DRIVER_PREFIXES)

    @property
    def resolved(self) -> bool:
        return self.error is None


def _locate(soname: str, loader: Path | None) -> Path | None:
    """The file ``soname`` is in the RPATH/RUNPATH folders of ``loader``, if it is there."""
    for folder in read_dynamic(loader).search_dirs if loader is not None else []:
        candidate = Path(folder) / soname
        if candidate.exists():
            return candidate
    return None


def _load(soname: str, loader: Path | None) -> str:
    """Load ``soname`` as the dynamic loader would for ``loader``; its path. Raises OSError when it cannot."""
    already = _path_of(soname)
    if already is not None:
        return already
    candidate = _locate(soname, loader)
    if candidate is not None:
        ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
        return str(candidate)
    ctypes.CDLL(soname, mode=ctypes.RTLD_GLOBAL)
    return _path_of(soname) or "(loaded)"


Loader = Path | str | None
"""The library that needs or opens a soname: its path, its soname (resolved first), or None."""


def resolve_closure(wanted: list[tuple[str, Loader]]) -> list[Library]:
    """Load each ``(soname, loader)`` in order, and everything those need, recursively; what resolved where.

    ``loader`` is the library that needs (or ``dlopen``s) the soname: its RPATH/RUNPATH folders are
    searched first, as the dynamic loader does; given as a soname, it is one resolved earlier in the
    list. A soname already loaded (by ``preload_dlls()``) is found as it is.
    """
    where: dict[str, str] = {}
    found: list[Library] = []
    queue = list(wanted)
    while queue:
        soname, loader = queue.pop(0)
        if soname in where or any(lib.soname == soname for lib in found):
            continue
        if isinstance(loader, str):
            loader = Path(where[loader]) if where.get(loader, "").startswith("/") else None
        needed_by = loader.name if loader is not None else "onnxruntime"
        try:
            path = _load(soname, loader)
        except (OSError, ElfError) as e:
            failed = Library(soname, needed_by, None, str(e))
            found.append(failed)
            located = _locate(soname, loader) if failed.driver else None
            if located is not None:  # it loads with the driver: check what else it needs
                with contextlib.suppress(ElfError, OSError):
                    queue[0:0] = [(child, located) for child in needed_libraries(located)]
            continue
        where[soname] = path
        found.append(Library(soname, needed_by, path, None))
        if path.startswith("/"):
            with contextlib.suppress(ElfError, OSError):
                children: list[tuple[str, Loader]] = [(child, Path(path)) for child in needed_libraries(Path(path))]
                queue[0:0] = children
    return found


def runtime_loaded(provider_needs: list[str]) -> list[tuple[str, str]]:
    """Libraries the CUDA provider opens at run time rather than at load (so absent from ``DT_NEEDED``):
    cuDNN, cuFFT and NVRTC for the CUDA major version it links, and the cuDNN sub-libraries that
    ``libcudnn.so.9`` opens itself. Pairs of (soname, the soname of the library that opens it)."""
    major = next((n.rsplit(".", 1)[1] for n in provider_needs if n.startswith("libcudart.so.")), "13")
    cufft = "12" if major.isdigit() and int(major) >= 13 else "11"
    provider = "libonnxruntime_providers_cuda.so"
    pairs = [(f"libcufft.so.{cufft}", provider), (f"libnvrtc.so.{major}", provider), ("libcudnn.so.9", provider)]
    pairs += [(f"libcudnn_{part}.so.9", "libcudnn.so.9") for part in CUDNN_PARTS]
    return pairs


def _preload(ort: Any) -> str:
    """``onnxruntime.preload_dlls()`` when the wheel has it; what it printed, or why it was not run."""
    if not hasattr(ort, "preload_dlls"):
        return "onnxruntime has no preload_dlls(): libraries come from the system's loader path only"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            ort.preload_dlls()
        except Exception as e:  # it reports missing packages by raising on some versions
            print(f"preload_dlls() failed: {e}")
    text = out.getvalue().strip()
    return "preload_dlls(): " + (text.replace("\n", "; ") if text else "done")


def gpu_count() -> tuple[int, str]:
    """GPUs the driver reports, and how that was found (0 with the reason when there is no driver)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver here (libcuda.so.1 does not load)"
    if cuda.cuInit(0) != 0:
        return 0, "the NVIDIA driver is here but cuInit failed (no usable GPU, or a driver too old)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0, "cuDeviceGetCount failed"
    return count.value, f"{count.value} GPU(s) reported by the driver"


# ---------------------------------------------------------------------------------------------
# CUDA against CPU


def _cosines(a: Any, b: Any) -> Any:
    import numpy as np

    a2 = np.asarray(a, np.float64).reshape(len(a), -1)
    b2 = np.asarray(b, np.float64).reshape(len(b), -1)
    return (a2 * b2).sum(1) / (np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1) + 1e-12)


def compare_devices(model: Path, reference: Path, rows: int = 32) -> tuple[float, float]:
    """Smallest row cosine between ``model`` on CUDA and ``reference`` (FP32) on the CPU; the bar it must meet."""
    from worker.calibrate import synthetic_requests
    from worker.pipelines.tensor import load_pipeline
    from worker.settings import Settings

    cuda = load_pipeline(Settings(model=model, device="cuda").model_config)
    cpu = load_pipeline(Settings(model=reference, device="cpu").model_config)
    requests = synthetic_requests(cpu, rows)
    worst = 1.0
    for request in requests:
        on_cuda = cuda.run([cuda.prepare(request, max_rows=rows)])[0]
        on_cpu = cpu.run([cpu.prepare(request, max_rows=rows)])[0]
        for name, value in on_cpu.items():
            worst = min(worst, float(_cosines(on_cuda[name], value).min()))
    return worst, FP16_MIN_COSINE if precision(model) == "fp16" else FP32_MIN_COSINE


def precision(model: Path) -> str:
    """A model folder's precision from its manifest (``fp32`` when it says none, or for a bare ONNX file)."""
    import json

    with contextlib.suppress(OSError, ValueError):
        return str(json.loads((model / "model.json").read_text()).get("precision", "fp32"))
    return "fp16" if "fp16" in model.name.lower() else "fp32"


def _variants(model: Path) -> Iterator[Path]:
    yield model
    for suffix in ("-opt", "-fp16"):
        variant = model.with_name(model.name + suffix)
        if variant.exists():
            yield variant


# ---------------------------------------------------------------------------------------------
# The check


def run_check(model: Path, *, libraries_only: bool = False) -> int:
    """Print the check's findings; 0 when everything checked passed, else 1."""
    problems: list[str] = []
    try:
        import onnxruntime as ort
    except ImportError as e:
        print(f"gpu-check: FAIL: onnxruntime does not import: {e}")
        return 1
    providers = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}")
    print(f"providers: {', '.join(providers)}")
    if "CUDAExecutionProvider" not in providers:
        problems.append("this ONNX Runtime has no CUDAExecutionProvider (the CPU wheel?): install the gpu extra")
    print(_preload(ort))
    capi = Path(ort.__file__).parent / "capi"
    roots = [capi / name for name in PROVIDER_LIBRARIES]
    missing_roots = [p.name for p in roots if not p.exists()]
    if missing_roots:
        problems.append(f"provider libraries not in {capi}: {', '.join(missing_roots)}")
    wanted: list[tuple[str, Loader]] = [
        (soname, root) for root in roots if root.exists() for soname in needed_libraries(root)
    ]
    cuda_provider = capi / PROVIDER_LIBRARIES[1]
    if cuda_provider.exists():
        wanted += [
            (soname, cuda_provider if opener == cuda_provider.name else opener)
            for soname, opener in runtime_loaded(needed_libraries(cuda_provider))
        ]
    libraries = resolve_closure(wanted)
    gpus, why = gpu_count()
    print(f"libraries the CUDA provider set needs, at load and at run time ({len(libraries)}; TensorRT's left out):")
    for lib in libraries:
        if lib.resolved:
            print(f"  ok       {lib.soname:<34} {lib.path or '(loaded)'}")
        elif lib.soname.startswith(DRIVER_PREFIXES):
            print(f"  driver   {lib.soname:<34} not here: the NVIDIA driver provides it on a GPU node")
        elif lib.driver:
            print(f"  driver   {lib.soname:<34} found, loads only with the NVIDIA driver: {lib.error}")
        else:
            print(f"  MISSING  {lib.soname:<34} needed by {lib.needed_by}: {lib.error}")
    for lib in libraries:
        if not lib.resolved and (not lib.driver or gpus):
            problems.append(f"{lib.soname} does not resolve (needed by {lib.needed_by})")
    print(f"GPU: {why}")
    if not libraries_only and gpus and not problems:
        reference = model
        for variant in _variants(model):
            try:
                worst, bar = compare_devices(variant, reference)
            except Exception as e:
                problems.append(f"{variant}: a CUDA session failed: {e}")
                continue
            verdict = "ok" if worst >= bar else "TOO FAR"
            print(f"  {verdict:<8} {variant.name}: smallest cosine CUDA vs CPU FP32 {worst:.6f} (needs >= {bar})")
            if worst < bar:
                problems.append(f"{variant.name} on CUDA differs from the CPU: cosine {worst:.6f} < {bar}")
    elif not libraries_only and not gpus:
        print("CUDA session check skipped: no GPU here")
    if problems:
        print("gpu-check: FAIL:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("gpu-check: PASS" + ("" if gpus and not libraries_only else " (libraries only)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    from worker.settings import DEFAULT_MODEL_PATH

    parser = argparse.ArgumentParser(prog="python -m worker.gpu_check", description=__doc__.splitlines()[0])
    default_model = Path(os.environ.get("WORKER_MODEL", DEFAULT_MODEL_PATH))
    parser.add_argument("--model", type=Path, default=default_model, help="model folder to compare on CUDA and CPU")
    parser.add_argument("--libraries-only", action="store_true", help="check the libraries, never open a session")
    args = parser.parse_args(argv)
    return run_check(args.model, libraries_only=args.libraries_only)


if __name__ == "__main__":
    sys.exit(main())
