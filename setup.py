"""Build of xbai-kernels: pure Python, plus an optional CUDA module ``xbai_kernels._C`` built by CMake.

The module is ``_C.abi3.so``: CPython's stable ABI, no torch, no libpython, so one built file serves
every torch release and every CPython >= 3.10 (CMakeLists.txt says how).

``XBAI_KERNELS_BUILD_CUDA``: ``auto`` (default) builds when nvcc is found and never fails the
install; ``1`` builds or fails loudly; ``0`` skips. ``XBAI_KERNELS_CUDA_ARCHS`` picks the targets
(CMake's ``CMAKE_CUDA_ARCHITECTURES`` syntax), ``MAX_JOBS`` caps the parallel compile jobs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if candidate and Path(candidate).is_file():
            return candidate
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _default_jobs() -> int:
    # nvcc needs about 2 GB per job on these kernels: cap by memory as well as by cores.
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gb = 8
    return max(1, min(os.cpu_count() or 1, int(memory_gb // 2)))


class CMakeBuild(build_ext):
    def run(self) -> None:
        mode = os.environ.get("XBAI_KERNELS_BUILD_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise SystemExit(f"XBAI_KERNELS_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
        if mode == "0":
            print("xbai-kernels: XBAI_KERNELS_BUILD_CUDA=0, skipping the CUDA module")
            return
        nvcc = _find_nvcc()
        if nvcc is None or not (ROOT / "CMakeLists.txt").is_file():
            if mode == "1":
                raise SystemExit("xbai-kernels: XBAI_KERNELS_BUILD_CUDA=1 but nvcc (or CMakeLists.txt) was not found")
            print("xbai-kernels: nvcc not found, skipping the CUDA module (Triton and reference paths remain)")
            return
        try:
            for ext in self.extensions:
                self._build_cmake(ext, nvcc)
        except (subprocess.CalledProcessError, OSError) as exc:
            if mode == "1":
                raise
            print(f"xbai-kernels: the CUDA module failed to build ({exc}); installing without it", file=sys.stderr)

    def _build_cmake(self, ext: Extension, nvcc: str) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        config = [
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DXBAI_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        archs = os.environ.get("XBAI_KERNELS_CUDA_ARCHS")
        # -U drops a list cached by an earlier build, so an unset variable means CMakeLists' default.
        config.append(f"-DXBAI_CUDA_ARCHS={archs}" if archs else "-UXBAI_CUDA_ARCHS")
        subprocess.check_call(["cmake", str(ROOT), *generator, *config], cwd=build_dir)
        jobs = os.environ.get("MAX_JOBS", str(_default_jobs()))
        subprocess.check_call(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir)


setup(
    ext_modules=[Extension("xbai_kernels._C", sources=[], py_limited_api=True)],
    cmdclass={"build_ext": CMakeBuild},
    # The module uses only the 3.10 stable ABI: the wheel is tagged cp310-abi3 and serves 3.10+.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
