"""A compiled step's device timeline from XLA's profiler: capture it to an xplane file.

The per-stage breakdowns (`bench_e2e.step_breakdown`) sum kernel durations, and call the rest of
the step time "gaps"; they cannot say whether the GPU idles between dependent kernels, waits for
the host's launches, or runs kernels side by side. XLA's profiler (CUPTI activity records, with
start times, and the host's launch calls) can: `capture` writes the xplane of a few steps, with
XLA's command buffers on and off, for analysis here or on another machine.
"""

from __future__ import annotations

import glob
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def capture(run_step: Callable[[], object], path: Path, steps: int = 3) -> Path:
    """Run `run_step` (one synchronised step) once untraced, then `steps` times under XLA's
    profiler (no Python tracer, no HLO protos: the file holds the timeline only), and write the
    xplane to `path` (the profiler's own directory tree is nested five deep); returns `path`."""
    import jax

    run_step()
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.enable_hlo_proto = False
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, profiler_options=options):
            for _ in range(steps):
                run_step()
        found = sorted(glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True))
        if not found:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {log_dir}")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(found[-1], path)
    return path
