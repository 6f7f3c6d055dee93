"""CI check of the CUDA build (no GPU needed): csrc/ compiles with the machine's nvcc, the module
holds Hopper (sm_90a) and Ampere code plus PTX, and it depends on neither torch nor libpython, so
the one built file imports under this torch and under every CPython >= 3.10 found here.

Skipped when nvcc or cmake is missing. The build goes to a temporary directory (about 15-30 s on
two cores), so the test never touches the installed module.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or next(
    (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc",) if p.is_file()), None
)
CMAKE = shutil.which("cmake")
pytestmark = pytest.mark.skipif(NVCC is None or CMAKE is None, reason="needs nvcc and cmake to compile csrc/")

# What a torch-ABI-dependent module would need; none may appear in ours.
FORBIDDEN_LIBRARIES = ("torch", "c10", "libpython", "cudart", "libstdc++")
FORBIDDEN_SYMBOL_PARTS = ("c10", "at::", "torch", "pybind11", "_ZN2at", "_ZN5torch")


def _find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the nvidia-cuda-cuobjdump wheel (test extra)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [Path(NVCC).resolve().parent / "cuobjdump"] if NVCC else []
    try:
        import nvidia

        candidates += [Path(p) / "cu13" / "bin" / "cuobjdump" for p in nvidia.__path__]
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


@pytest.fixture(scope="module")
def built_module(tmp_path_factory) -> Path:
    """csrc/ built by CMakeLists.txt with its default targets into a temporary directory."""
    build = tmp_path_factory.mktemp("cuda_build")
    out = build / "out"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        CMAKE, "-S", str(ROOT), "-B", str(build / "cmake"), *generator,
        f"-DCMAKE_CUDA_COMPILER={NVCC}", f"-DPython_EXECUTABLE={sys.executable}", f"-DXBAI_OUTPUT_DIR={out}",
    ]
    jobs = os.environ.get("MAX_JOBS", "2")
    for command in (configure, [CMAKE, "--build", str(build / "cmake"), "--parallel", jobs]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    modules = list(out.glob("_C*.so"))
    assert [m.name for m in modules] == ["_C.abi3.so"], modules
    return modules[0]


def test_module_holds_sm90a_and_sm80_code_and_ptx(built_module):
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    elves = subprocess.run([cuobjdump, "--list-elf", str(built_module)], capture_output=True, text=True, check=True)
    archs = set(re.findall(r"\.(sm_\w+)\.cubin", elves.stdout))
    assert archs == {"sm_80", "sm_90a"}, elves.stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(built_module)], capture_output=True, text=True, check=True)
    # PTX of the oldest target lets the driver JIT the kernels for GPUs newer than Hopper.
    # One PTX entry per CUDA source file, all for compute_80 (the JIT fallback on newer GPUs).
    assert set(re.findall(r"\.(sm_\w+)\.ptx", ptx.stdout)) == {"sm_80"}, ptx.stdout


def test_module_needs_no_torch_python_or_cuda_runtime_library(built_module):
    readelf = shutil.which("readelf")
    if readelf is not None:
        dynamic = subprocess.run([readelf, "-d", str(built_module)], capture_output=True, text=True, check=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    else:
        listing = subprocess.run(["ldd", str(built_module)], capture_output=True, text=True).stdout
        needed = [line.split()[0] for line in listing.splitlines() if line.strip()]
    assert needed, "no dependency list could be read"
    for library in needed:
        assert not any(part in library for part in FORBIDDEN_LIBRARIES), f"module links {library}: {needed}"


def test_module_exports_only_its_init_and_imports_no_torch_symbol(built_module):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    defined = subprocess.run([nm, "-D", "--defined-only", str(built_module)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in defined.stdout.splitlines() if line.split()[1:2] != ["w"]}
    # The static CUDA runtime and libstdc++ stay hidden, so they cannot clash with torch's copies.
    assert exported == {"PyInit__C"}, exported
    undefined = subprocess.run(
        [nm, "-D", "--undefined-only", "--demangle", str(built_module)], capture_output=True, text=True, check=True
    )
    symbols = [line.split()[-1] for line in undefined.stdout.splitlines() if line.strip()]
    assert not [s for s in symbols if any(part in s for part in FORBIDDEN_SYMBOL_PARTS)], symbols


def _import_check(python: str, module: Path) -> subprocess.CompletedProcess:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('xbai_kernels._C', {str(module)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert m.workspace_bytes(m.ROWS_MASKED, 256, 5120) > 0\n"
        "print(m.compiled_targets())\n"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)


def test_module_imports_next_to_this_torch_without_a_gpu(built_module):
    result = _import_check(sys.executable, built_module)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sm_80", "compute_80", "sm_90a"]
    # Loaded after torch, in one process: no symbol clash, no second CUDA runtime to conflict with.
    code = (
        "import torch, importlib.util as u\n"
        f"s = u.spec_from_file_location('xbai_kernels._C', {str(built_module)!r})\n"
        "m = u.module_from_spec(s); s.loader.exec_module(m)\n"
        "print(torch.__version__, m.compiled_targets())\n"
    )
    with_torch = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert with_torch.returncode == 0, with_torch.stderr
    assert "sm_90a" in with_torch.stdout


def _other_pythons() -> list[str]:
    """CPython >= 3.10 interpreters on this machine other than the one running the tests."""
    found = set()
    for minor in range(10, 15):
        path = shutil.which(f"python3.{minor}")
        if path:
            found.add(path)
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for version_dir in pyenv_root.glob("3.1[0-9]*"):
        for exe in version_dir.glob("bin/python3.1[0-9]"):
            found.add(str(exe))
    current = Path(sys.executable).resolve()
    usable = []
    for exe in sorted(found):
        if Path(exe).resolve() == current:
            continue
        probe = subprocess.run([exe, "-c", "import sys; print(sys.version_info >= (3, 10))"], capture_output=True,
                               text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            usable.append(exe)
    return usable


def test_same_file_imports_under_other_cpython_versions(built_module):
    pythons = _other_pythons()
    if not pythons:
        pytest.skip("no other CPython >= 3.10 on this machine")
    for python in pythons:
        result = _import_check(python, built_module)
        assert result.returncode == 0, f"{python}: {result.stderr}"
        assert "sm_90a" in result.stdout
