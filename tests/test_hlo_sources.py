"""benchmarks.hlo_sources: a compiled program's instructions are named by the source line that
made them, and kernel timings are summed per line."""

import inspect
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.hlo_sources import instruction_sources, kernel_key, time_by_source


def _scaled_exp(x):
    return jnp.exp(x) * 3.0


def _plus_one(x):
    return _scaled_exp(x) + 1.0


def test_instructions_named_by_innermost_source_line():
    text = jax.jit(_plus_one).lower(jnp.ones((8,), jnp.float32)).compile().as_text()
    sources = instruction_sources(text, root=str(Path(__file__).parent))
    first = inspect.getsourcelines(_scaled_exp)[1]
    exp_line = f"test_hlo_sources.py:{first + 1} _scaled_exp"
    assert exp_line in set(sources.values()), sources
    # Nothing outside the root (jax's own files) is ever named.
    assert all(where.startswith("test_hlo_sources.py:") for where in sources.values())


def test_time_by_source_sums_launches():
    sources = {"loop_fusion_1": "a.py:1 f", "loop_fusion_2": "a.py:1 f", "input_fusion": "b.py:2 g"}
    timings = [("loop_fusion.1", 1.0), ("loop_fusion_2", 2.0), ("input_fusion", 0.5), ("loop_fusion.1", 1.0),
               ("cast_fusion_7", 0.25)]
    totals = time_by_source(timings, sources)
    assert totals == {"a.py:1 f": (4.0, 3), "b.py:2 g": (0.5, 1), "(no source) cast_fusion": (0.25, 1)}
    assert list(totals) == ["a.py:1 f", "b.py:2 g", "(no source) cast_fusion"]
    assert kernel_key("a.b-c") == "a_b_c"
