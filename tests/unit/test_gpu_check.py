"""The CUDA-path check (``make gpu-check``): ELF reading and library resolution on real files, its verdict
on an ONNX Runtime without CUDA. The CUDA wheels themselves are checked by ``make gpu-check``."""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import pytest

from worker.gpu_check import ElfError, Library, read_dynamic, resolve_closure, run_check, runtime_loaded

PYBIND = next((Path(onnxruntime.__file__).parent / "capi").glob("onnxruntime_pybind11_state*.so"))


def test_the_dynamic_section_of_a_real_library_is_read() -> None:
    dynamic = read_dynamic(PYBIND)
    assert "libc.so.6" in dynamic.needed or any(n.startswith("libstdc++") for n in dynamic.needed), dynamic
    assert all("$ORIGIN" not in d for d in dynamic.search_dirs), "$ORIGIN is expanded"


def test_a_file_that_is_not_elf_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "libfake.so"
    text.write_text("not a library")
    with pytest.raises(ElfError, match="not a 64-bit little-endian ELF file"):
        read_dynamic(text)


def test_libraries_resolve_recursively_and_a_missing_one_is_named() -> None:
    found = {lib.soname: lib for lib in resolve_closure([("libz.so.1", None), ("libqinfer-absent.so.1", None)])}
    assert found["libz.so.1"].resolved
    assert found["libz.so.1"].path is not None
    assert "libc.so.6" in found, "what libz needs is checked too"
    assert not found["libqinfer-absent.so.1"].resolved
    assert "libqinfer-absent.so.1" in (found["libqinfer-absent.so.1"].error or "")


def test_driver_libraries_are_told_apart_from_missing_ones() -> None:
    assert Library("libcuda.so.1", "x", None, "cannot open").driver
    assert Library("libcudnn_engines_runtime_compiled.so.9", "x", None, "libcuda.so.1: cannot open").driver
    assert not Library("libcublas.so.13", "x", None, "libcublas.so.13: cannot open").driver


def test_the_run_time_libraries_follow_the_cuda_version_the_provider_links() -> None:
    assert ("libcufft.so.12", "libonnxruntime_providers_cuda.so") in runtime_loaded(["libcudart.so.13"])
    assert ("libcufft.so.11", "libonnxruntime_providers_cuda.so") in runtime_loaded(["libcudart.so.12"])
    assert ("libcudnn_graph.so.9", "libcudnn.so.9") in runtime_loaded(["libcudart.so.13"])


def test_an_onnx_runtime_without_cuda_fails_the_check_saying_why(capsys: pytest.CaptureFixture[str]) -> None:
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this environment has the CUDA provider; make gpu-check covers it")
    assert run_check(Path("unused"), libraries_only=True) == 1
    out = capsys.readouterr().out
    assert "gpu-check: FAIL" in out
    assert "no CUDAExecutionProvider" in out
