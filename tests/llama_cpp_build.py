"""A real llama.cpp for the tests: built once from the llama-cpp-python sdist tests/real_vocab.py caches.

The sdist vendors llama.cpp's source and the `llama_cpp` Python bindings for exactly that source.
CMake builds libllama and ggml's CPU backend alone from vendor/llama.cpp (`--target llama`, -j2): not
through pip, whose build of the sdist also compiles llama.cpp's `common` library and its HTTP client
(about 40% of the compile time, which llama-cpp-python's CMakeLists.txt forces on) and fetches the
build backend. The libraries go into the bindings' `llama_cpp/lib/`, where they look for them, and
`diskcache`, a pure-Python package the bindings import and peftko does not need, beside them with
`pip install --no-deps --target` (the package index is needed for this setup only).

The folder is `cache_root()/llama-cpp-python-VERSION-KEY`, KEY naming the Python version, the machine
and a hash of the CPU's instruction-set flags and of the build options (ggml is built with
-march=native, so a cache carried to another CPU is built again rather than crashing on an
instruction it lacks). It is built in a temporary folder beside it and renamed last, so a half build
is never used; a later run finds it and builds nothing.

The tests run llama.cpp in a subprocess with PYTHONPATH=DIR (tests/llama_cpp_worker.py): a native
crash then fails a test instead of pytest, and the test environment is not modified.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.real_vocab import SDIST_VERSION, RealVocabUnavailable, cache_root, fetch_sdist

IN_SDIST = f"llama_cpp_python-{SDIST_VERSION}/"
DISKCACHE = "diskcache==5.6.3"
BUILD_VERSION = 2  # bump when the way the folder is built changes
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON",
                 "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                 # libllama finds libggml beside it, wherever the folder is
                 "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN")
WORKER = Path(__file__).with_name("llama_cpp_worker.py")


@pytest.fixture(scope="module")
def llama_cpp_site():
    """The folder holding the built llama_cpp package (PYTHONPATH for tests/llama_cpp_worker.py);
    skipped when it cannot be built, failed under CI=true (CI must not skip it silently)."""
    try:
        return llama_cpp_python()
    except RealVocabUnavailable as e:
        reason = f"llama.cpp could not be built: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{flags}|{CMAKE_OPTIONS}|{BUILD_VERSION}".encode()).hexdigest()[:10]


def build_dir(root: Path | None = None) -> Path:
    root = root or cache_root()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}-{_cpu_key()}"
    return root / f"llama-cpp-python-{SDIST_VERSION}-{tag}"


def built(target: Path) -> bool:
    return ((target / "llama_cpp" / "__init__.py").is_file() and (target / "diskcache").is_dir()
            and any((target / "llama_cpp" / "lib").glob("libllama.*")))


def llama_cpp_python(root: Path | None = None) -> Path:
    """The folder to put on PYTHONPATH for `import llama_cpp`, built the first time (minutes)."""
    target = build_dir(root)
    if built(target):
        return target
    sdist = fetch_sdist(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _build(sdist, tmp)
        (tmp / "site").chmod(0o755)
        try:
            os.replace(tmp / "site", target)
        except OSError:  # another process finished first; its folder is as good as ours
            if not built(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(sdist: Path, tmp: Path) -> None:
    try:
        with tarfile.open(sdist) as tar:  # the source and the bindings, not llama.cpp's test vocabularies
            members = [m for m in tar if m.name.startswith((IN_SDIST + "llama_cpp/", IN_SDIST + "vendor/llama.cpp/"))
                       and not m.name.startswith(IN_SDIST + "vendor/llama.cpp/models/")]
            tar.extractall(tmp / "src", members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RealVocabUnavailable(f"cannot extract llama.cpp from {sdist}: {e}; delete it to fetch it again") from e
    src, build, site = tmp / "src" / IN_SDIST, tmp / "build", tmp / "site"
    _run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *CMAKE_OPTIONS], "configuring llama.cpp")
    _run(["cmake", "--build", str(build), "--target", "llama", "-j", "2"], "building llama.cpp")
    shutil.copytree(src / "llama_cpp", site / "llama_cpp")
    lib = site / "llama_cpp" / "lib"
    lib.mkdir(exist_ok=True)
    for so in build.rglob("lib*.so*"):  # libllama, libggml, libggml-base, libggml-cpu and their soname links
        shutil.copy2(so, lib / so.name, follow_symlinks=False)
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check",
          "--target", str(site), DISKCACHE], "installing diskcache")


def _run(cmd: list[str], what: str) -> None:
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, errors="replace", timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RealVocabUnavailable(f"{what} failed: {e}") from e
    if done.returncode != 0:
        tail = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()][-8:]
        raise RealVocabUnavailable(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n  " + "\n  ".join(tail))


def run_worker(site: Path, request: dict, timeout: float = 600) -> dict:
    """tests/llama_cpp_worker.py in a subprocess that imports llama_cpp from `site`: its JSON answer."""
    import json

    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, str(WORKER)], check=False, input=json.dumps(request), capture_output=True,
                          text=True, errors="replace", env=env, timeout=timeout)
    assert done.returncode == 0, f"llama.cpp worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_difference(got: list[int], want: list[int]) -> int | None:
    """The first position where two id lists differ (a length difference counts), or None."""
    if got == want:
        return None
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def marker_problems(markers: dict[str, int], llama_ids: dict[str, list[int]], hf_ids: dict[str, list[int]]) -> list[str]:
    """Each marker must be one token in llama.cpp and in transformers, both its recorded id."""
    return [f"{m}: llama.cpp {llama_ids[m]}, transformers {hf_ids[m]}, recorded {i}"
            for m, i in markers.items() if not (llama_ids[m] == hf_ids[m] == [i])]


def id_problems(names: list[str], llama_ids: list[list[int]], hf_ids: list[list[int]]) -> list[str]:
    """Each text's ids must be the same in llama.cpp and transformers; where not, where and what."""
    problems = []
    for name, got, want in zip(names, llama_ids, hf_ids, strict=True):
        at = first_difference(got, want)
        if at is not None:
            problems.append(f"{name}: from token {at} of {len(want)}: llama.cpp {got[at:at + 5]}, "
                            f"transformers {want[at:at + 5]}")
    return problems
