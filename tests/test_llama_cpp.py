"""llama.cpp itself, built for the tests: the build is cached, and the comparisons fail when they must.

tests/llama_cpp_build.py builds llama.cpp's libllama and CPU backend from the sdist that
tests/real_vocab.py caches, once per machine, into the user's cache folder, beside the sdist's own
llama_cpp bindings. On a 2-core machine that other jobs kept busy (load about 5) the build took
3 min 42 s of wall time (3 min 12 s of CPU; 7.9 MB written); building the sdist with pip instead,
which also compiles llama.cpp's `common` library and its HTTP client, took 13 min 27 s there. Later
runs find the folder and build nothing (under a second). The real base's merged model is checked with
it in tests/test_real_base.py: markers, the sample corpus's ids, greedy continuations, q8_0's top-1
agreement and a grammar-constrained book; tests/test_gguf_export.py's tiny Llama-3 export is tokenized
with it too. Here: the cache, and the comparison helpers on a split marker and on ids that differ.
"""

from __future__ import annotations

import time

import pytest

from tests.llama_cpp_build import build_dir, first_difference, id_problems, llama_cpp_python, marker_problems
from tests.llama_cpp_build import llama_cpp_site  # noqa: F401 - a fixture


@pytest.mark.slow  # builds llama.cpp the first time on a machine (minutes); a second after
def test_the_build_is_cached_and_imports_from_its_folder(llama_cpp_site):  # noqa: F811
    import subprocess
    import sys

    assert llama_cpp_site == build_dir()
    stamp = (llama_cpp_site / "llama_cpp" / "__init__.py").stat().st_mtime_ns
    start = time.monotonic()
    assert llama_cpp_python() == llama_cpp_site  # found, not built again
    assert time.monotonic() - start < 1
    assert (llama_cpp_site / "llama_cpp" / "__init__.py").stat().st_mtime_ns == stamp
    assert not [p for p in llama_cpp_site.parent.iterdir() if p.name.startswith(f".{llama_cpp_site.name}-")]
    # the test environment does not have it; the subprocess does
    code = "import llama_cpp, diskcache; print(llama_cpp.__version__, llama_cpp.__file__)"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          env={"PYTHONPATH": str(llama_cpp_site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    version, where = done.stdout.split()
    assert version == "0.3.36" and where.startswith(str(llama_cpp_site))


def test_a_split_marker_is_reported():
    markers = {"|START_OF_BOOK|>": 262148, "|END_OF_BOOK|>": 262144}
    hf = {"|START_OF_BOOK|>": [262148], "|END_OF_BOOK|>": [262144]}
    assert marker_problems(markers, dict(hf), hf) == []
    # What llama.cpp made of the marker with the real base's GGUF, from before the markers were added
    split = {**hf, "|END_OF_BOOK|>": [236909, 8516, 236779, 19069, 236779, 56819, 111038]}
    assert marker_problems(markers, split, hf) == [("|END_OF_BOOK|>: llama.cpp [236909, 8516, 236779, 19069, "
                                                    "236779, 56819, 111038], transformers [262144], recorded 262144")]
    other = {**hf, "|START_OF_BOOK|>": [262144]}  # one token, but not the recorded id
    assert len(marker_problems(markers, other, hf)) == 1
    # both sides agreeing on a split is still a split
    assert len(marker_problems(markers, split, split)) == 1


def test_ids_that_differ_are_reported_where_they_differ():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 4], [1, 2, 3]) == 2
    assert first_difference([1, 2], [1, 2, 3]) == 2  # one is a prefix of the other
    assert id_problems(["a.txt", "b.txt"], [[5, 6], [7, 8, 9]], [[5, 6], [7, 80, 9]]) == [
        "b.txt: from token 1 of 3: llama.cpp [8, 9], transformers [80, 9]"]
    # a BOS on one side only (what comparing with add_bos=True in llama.cpp would give)
    assert id_problems(["a.txt"], [[2, 262148, 107]], [[262148, 107]]) == [
        "a.txt: from token 0 of 2: llama.cpp [2, 262148, 107], transformers [262148, 107]"]
    with pytest.raises(ValueError):  # a text missing on one side is not silently skipped
        id_problems(["a.txt", "b.txt"], [[5, 6]], [[5, 6], [7]])
