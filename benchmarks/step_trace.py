"""A compiled step's device timeline from XLA's profiler: capture it to an xplane file.

The per-stage breakdowns (`bench_e2e.step_breakdown`) sum kernel durations, and call the rest of
the step time "gaps"; they cannot say whether the GPU idles between dependent kernels, waits for
the host's launches, or runs kernels side by side. XLA's profiler (CUPTI activity records, with
start times, and the host's launch calls) can: `capture` writes the xplane of a few steps, with
XLA's command buffers on and off, for analysis here or on another machine.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path


def capture(run_step: Callable[[], object], log_dir: Path, steps: int = 3) -> Path:
    """Run `run_step` (one synchronised step) once untraced, then `steps` times under XLA's
    profiler (no Python tracer, no HLO protos: the file holds the timeline only); returns the
    path of the .xplane.pb written under `log_dir`."""
    import jax

    run_step()
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.enable_hlo_proto = False
    with jax.profiler.trace(str(log_dir), profiler_options=options):
        for _ in range(steps):
            run_step()
    found = sorted(glob.glob(str(log_dir / "**" / "*.xplane.pb"), recursive=True))
    if not found:
        raise RuntimeError(f"the profiler wrote no .xplane.pb under {log_dir}")
    return Path(found[-1])
