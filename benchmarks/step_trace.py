"""A compiled step's device timeline from XLA's profiler: capture it, and say where its time goes.

The per-stage breakdowns (`bench_e2e.step_breakdown`) sum kernel durations and call the rest of
the step time "gaps"; they cannot say whether the GPU idles between dependent kernels, waits for
the host, or runs kernels side by side. XLA's profiler can (CUPTI activity records with start
times, kernels replayed from XLA's CUDA graphs included, and the host's own phases of a call):
`capture` writes the xplane of a few steps (`bench_fusions --trace`, `bench_generation --trace`),
and this module's command line reads such files (here or on another machine) into
timeline.{md,json}:
- device activity is cut into bursts where the GPU idles longer than `--split-us` (a synchronised
  call's host work, a host callback in a loop); per burst: kernels, span, busy time (the union of
  the kernels' intervals), idle inside it, which kernel transitions hold that idle, and the
  kernels' time and launches per kind (the per-stage breakdown, without the graphs-off
  recompilation `step_breakdown` needs);
- per traced call, the host's phases before its device work starts (argument parsing, XLA's
  thunk preparation and initialisation, the graph launch) and the delay from the call to the
  first kernel.

    PYTHONPATH=. python3 -m benchmarks.step_trace TRACE.xplane.pb ... --out benchmarks/results/timeline
"""

from __future__ import annotations

import glob
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import harness
from benchmarks.bench_e2e import stage_of

NAME = "timeline"
# The host phases of one jitted call, as XLA's profiler names them (PjRt, the GPU executable).
HOST_PHASES = ("ParseArguments", "CommonPjRtLoadedExecutable::ExecutePrepare", "Build buffer allocations",
               "Thunks::Prepare", "Thunks::Initialize", "cuGraphLaunch")
CALL = "PjitFunction"

Kernel = tuple[int, int, str]  # start ns, end ns, name


def capture(run_step: Callable[[], object], path: Path, steps: int = 3, warmup: int = 1) -> Path:
    """Run `run_step` (one synchronised step) `warmup` times untraced (0 when the caller has run
    it already), then `steps` times under XLA's profiler (no Python tracer, no HLO protos: the
    file holds the timeline only), and write the xplane to `path` (the profiler's own directory
    tree is nested five deep); returns `path`."""
    import jax

    for _ in range(warmup):
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


# ------------------------------------------------------------------------------------ analysis
def kernel_kind(name: str) -> str:
    """A kernel's family: its stage (`bench_e2e.stage_of`, the per-stage breakdown's), made finer
    where a timeline needs it: a Pallas kernel by its name (the W4A4 GEMM, named `kernel`, by its
    stage), memsets and copies by their kind, an XLA fusion by its name without the instance
    number."""
    if name.startswith(("Memset", "Memcpy", "memcpy")):
        return name.split()[0]
    stage = stage_of(name)
    if name.endswith("_mosaic_gpu_kernel"):
        stem = name[: -len("_mosaic_gpu_kernel")]
        return stage if stem == "kernel" else stem
    return "xla:" + re.sub(r"[._]\d+$", "", name) if stage == "xla_fusions" else stage


def bursts(kernels: Sequence[Kernel], split_ns: int) -> list[list[Kernel]]:
    """`kernels` (sorted by start) cut where the device idles longer than `split_ns`."""
    out: list[list[Kernel]] = []
    end = None
    for k in kernels:
        if end is None or k[0] - end > split_ns:
            out.append([])
            end = k[1]
        out[-1].append(k)
        end = max(end, k[1])
    return out


def busy_ns(kernels: Sequence[Kernel]) -> int:
    """The union of the kernels' intervals (kernels that overlap count once)."""
    total, end = 0, None
    for start, stop, _ in sorted(kernels):
        if end is None or start >= end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def burst_stats(burst: Sequence[Kernel], top: int = 6) -> dict:
    """Span, busy and idle time (ms) of one burst, the kernel transitions (kind -> kind) that
    hold most of its idle time, and its kernels' time and count per kind (`kernel_kind`): the
    per-stage breakdown, from kernels replayed in XLA's CUDA graphs too."""
    span = burst[-1][1] - burst[0][0] if burst else 0
    busy = busy_ns(burst)
    idle: dict[str, list] = {}
    end = burst[0][1] if burst else 0
    prev = burst[0] if burst else None
    for k in burst[1:]:
        gap = k[0] - end
        if gap > 0:
            key = f"{kernel_kind(prev[2])} -> {kernel_kind(k[2])}"
            cell = idle.setdefault(key, [0, 0])
            cell[0] += gap
            cell[1] += 1
        if k[1] >= end:
            end, prev = k[1], k
    held = sorted(idle.items(), key=lambda kv: -kv[1][0])[:top]
    kinds: dict[str, list] = {}
    for start, stop, name in burst:
        cell = kinds.setdefault(kernel_kind(name), [0, 0])
        cell[0] += stop - start
        cell[1] += 1
    return {"kernels": len(burst), "span_ms": span / 1e6, "busy_ms": busy / 1e6, "idle_ms": (span - busy) / 1e6,
            "idle_by_transition": [(key, ns / 1e6, n) for key, (ns, n) in held],
            "time_by_kind": [(key, ns / 1e6, n) for key, (ns, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])]}


def read(path: Path) -> tuple[str, list[Kernel], list[tuple[int, int, str]]]:
    """(GPU name, its kernels and copies sorted by start, the host's Python-thread events) of one
    xplane file."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(path))
    gpus = [p for p in data.planes if p.name.startswith("/device:GPU")]
    if not gpus:
        raise ValueError(f"{path}: no /device:GPU plane (a trace of a GPU run is needed; "
                         f"planes: {[p.name for p in data.planes]})")
    stats = dict(gpus[0].stats)
    kernels = sorted((int(ev.start_ns), int(ev.start_ns + ev.duration_ns), ev.name)
                     for line in gpus[0].lines for ev in line.events)
    host = [(int(ev.start_ns), int(ev.start_ns + ev.duration_ns), ev.name)
            for p in data.planes if p.name == "/host:CPU" for line in p.lines if line.name == "python"
            for ev in line.events]
    return str(stats.get("gpu_device_name", gpus[0].name)), kernels, sorted(host)


def host_calls(host: Sequence[tuple[int, int, str]], kernels: Sequence[Kernel], step_starts: Sequence[int]) -> list[dict]:
    """Per jitted call on the host (outermost `PjitFunction` event) during which a step starts on
    the device: its phases' durations (ms) and the delay from the call to its first kernel."""
    calls, outer_end = [], None
    for start, stop, name in host:
        if name.startswith(CALL) and (outer_end is None or start >= outer_end):
            calls.append((start, stop))
            outer_end = stop
    out = []
    for start, stop in calls:
        if not any(start <= t < stop for t in step_starts):
            continue
        phases = {p: sum(e - s for s, e, n in host if start <= s < stop and n.startswith(p)) / 1e6
                  for p in HOST_PHASES}
        first = next((k[0] for k in kernels if k[0] >= start), None)
        out.append({"call_ms": (stop - start) / 1e6, "phases_ms": phases,
                    "to_first_kernel_ms": None if first is None else (first - start) / 1e6})
    return out


def analyze(path: Path, split_us: float = 300.0) -> dict:
    """The timeline of one trace: its bursts of device activity (the steps: those with at least
    half the largest burst's kernels) and its host calls."""
    device, kernels, host = read(path)
    found = bursts(kernels, int(split_us * 1e3))
    most = max(len(b) for b in found)
    steps = [b for b in found if len(b) >= most / 2]
    per = [burst_stats(b) for b in steps]
    starts = [b[0][0] for b in steps]
    return {"trace": path.name, "device": device, "split_us": split_us, "bursts": len(found),
            "steps": per, "step_periods_ms": [(b - a) / 1e6 for a, b in zip(starts, starts[1:])],
            "host_calls": host_calls(host, kernels, starts)}


def _median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def markdown(results: Sequence[dict], captured: str = "") -> list[str]:
    lines = ["# Where a step's time goes: device timelines (XLA profiler)", "",
             "Each trace cut into bursts of device activity where the GPU idles longer than the split; the steps "
             "are the bursts with at least half the largest burst's kernels. Medians over the steps: span (first "
             "kernel start to last kernel end), busy (union of the kernels' intervals), idle inside the step; "
             "period: from one step's first kernel to the next one's (the loop's time per step, where the trace "
             "is of a loop). Host: per traced call that runs a step (a loop's call runs them all), the time from "
             "the call to its first kernel and XLA's phases before the device starts (medians, ms). Written by `python -m benchmarks.step_trace`." + (
                 f" Traces: {captured}" if captured else ""), ""]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines += harness.md_table(
        ["trace", "steps", "kernels", "span ms", "busy ms", "idle ms", "period ms", "call to first kernel ms"],
        [[f"`{r['trace']}`", len(r["steps"]), f"{_median([s['kernels'] for s in r['steps']]):.0f}",
          fmt(_median([s["span_ms"] for s in r["steps"]])), fmt(_median([s["busy_ms"] for s in r["steps"]])),
          fmt(_median([s["idle_ms"] for s in r["steps"]])), fmt(_median(r["step_periods_ms"])),
          fmt(_median([c["to_first_kernel_ms"] for c in r["host_calls"]]))] for r in results],
        [False] + [True] * 7)
    lines += ["", "Host phases of a call (median ms over the traced calls):", ""]
    lines += harness.md_table(
        ["trace", "calls", *HOST_PHASES],
        [[f"`{r['trace']}`", len(r["host_calls"]),
          *(fmt(_median([c["phases_ms"][p] for c in r["host_calls"]])) for p in HOST_PHASES)] for r in results],
        [False] + [True] * (1 + len(HOST_PHASES)))
    for r in results:
        if r["steps"]:
            s = r["steps"][len(r["steps"]) // 2]
            lines += ["", f"Idle inside the middle step of `{r['trace']}` by kernel transition "
                      f"({s['idle_ms']:.2f} ms in all):", ""]
            lines += harness.md_table(["transition", "ms", "count"],
                                      [[f"`{k}`", f"{ms:.3f}", n] for k, ms, n in s["idle_by_transition"]],
                                      [False, True, True])
            lines += ["", f"Kernel time of that step by kind ({s['busy_ms']:.2f} ms busy, {s['kernels']} kernels; "
                      "the 12 longest kinds):", ""]
            lines += harness.md_table(["kind", "ms", "launches"],
                                      [[f"`{k}`", f"{ms:.2f}", n] for k, ms, n in s["time_by_kind"][:12]],
                                      [False, True, True])
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = harness.argument_parser(__doc__)
    parser.add_argument("traces", nargs="+", type=Path, metavar="TRACE.xplane.pb")
    parser.add_argument("--split-us", type=float, default=300.0,
                        help="device idle (us) that separates two bursts (default 300)")
    parser.add_argument("--captured", default="", help="how and where the traces were captured (for the markdown)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / NAME)
    args = parser.parse_args(argv)
    results = [analyze(p, args.split_us) for p in args.traces]
    meta = dict(harness.run_meta(), device=results[0]["device"])
    harness.write_results(NAME, {"traces": results, "captured": args.captured}, markdown(results, args.captured),
                          args.out, meta=meta,
                          command="python -m benchmarks.step_trace " + " ".join(str(p) for p in args.traces))
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
