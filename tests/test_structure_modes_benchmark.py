"""benchmarks/structure_modes.py stands in its own processor for strict's (the forbid-markers mode), called
the way peftko.model.generation calls strict's: it must take every argument strict's takes, or the
benchmark stops after its first mode (it once did, when strict's gained `greedy`)."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

from peftko.model.structure import StructureProcessor

pytestmark = pytest.mark.slow  # it imports a benchmark script (transformers, peftko's generation)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "structure_modes.py"


def test_the_forbid_markers_processor_takes_every_argument_strict_s_takes():
    spec = importlib.util.spec_from_file_location("peftko_bench_structure_modes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    strict = inspect.signature(StructureProcessor.__init__).parameters
    stand_in = inspect.signature(module.ForbidMarkersOnly.__init__).parameters
    assert list(stand_in) == list(strict)
    assert all(stand_in[n].default == strict[n].default for n in strict)
