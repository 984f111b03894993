"""The one harness of the benchmarks: device timing, process isolation, variant registries and
the results writer (markdown + JSON, optional plot) under benchmarks/results/.

- Timing: `device_time_ms` (benchmarks/timing.py, re-exported here) is the CUPTI device time of
  a jitted op, median of `ITERS` over rotating input sets larger than L2. Whole-model steps are
  timed on the host clock around synchronised calls (`wall_ms`) and as calls issued back to back
  (`back_to_back_ms`; both: `step_times`), their kernels by CUPTI.
- Isolation: `run_isolated` runs one variant (or one group of variants sharing a model) in its
  own Python process with a timeout and collects the JSON it writes back (`emit`); a crash, an
  out-of-memory or a timeout costs that variant's rows, not the run, and each process's peak
  memory is its own; `run_each` runs a registry's variants so, one after another.
- Variants: a registry is a dict name -> `Variant` (what it needs to import, which process group
  it shares, free-form options read by the bench's worker): adding a variant is one entry.
- Command line and stages: `argument_parser` (--help from the bench's docstring); a kernel bench
  is a list of named stages (`stage_parser`, `run_stage_bench`, `run_stages`, `worker_stage`).
- Grids: `time_grid` times (implementation x named shape) cells in one worker, recording a
  failing cell as an error row.
- Results: `write_results` writes `<name>.json` (envelope: bench, schema, meta, summary, rows,
  the bench's own extra keys) and `<name>.md` (from `md_table` / `pivot_table`), plus
  `<name>.png` through `bar_plot`. `summary` holds the headline figures that benchmarks/report.py
  puts into README.md; every ratio in it is against a baseline measured in the same run.

Nothing here imports jax at module level: parents that only start children stay light.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import REPO, RESULTS, SCHEMA, load_results, md_table, update_readme  # noqa: F401
RESULT_ENV = "BENCH_RESULT_FILE"  # where a child started by run_isolated writes its JSON


# ------------------------------------------------------------------------------------ timing
def device_time_ms(fn, make_args, out_bytes: int = 0) -> float:
    """CUPTI device time of fn(*make_args(i)) (ms); see benchmarks/timing.py."""
    from benchmarks.timing import device_time_ms as _device_time_ms

    return _device_time_ms(fn, make_args, out_bytes)


def timing_iters() -> int:
    from benchmarks.timing import ITERS

    return ITERS


def wall_ms(call: Callable[[], Any], *, iters: int, warmup: int, sync: Callable[[Any], Any]) -> float:
    """Median host time (ms) of `sync(call())` over `iters` runs after `warmup` runs: for whole
    steps, where launch gaps are part of the cost."""
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sync(call())
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def back_to_back_ms(call: Callable[[], Any], *, iters: int, warmup: int, sync: Callable[[Any], Any],
                    repeats: int = 3) -> float:
    """Host time per call (ms) of `iters` calls issued back to back with one `sync` after the last
    (median of `repeats` such runs, after `warmup` synchronised calls): a step as a loop of steps
    runs it, where the host prepares the next call while the device runs the last one. A
    synchronised call (`wall_ms`) also counts the host's work before the device starts: for
    FLUX.1-dev's jitted W4A4 step ~10 ms on the H200's host (argument parsing of ~1100 state
    leaves, XLA's thunk preparation; `benchmarks.step_trace`), which a denoising loop pays once."""
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = [call() for _ in range(iters)]
        sync(outs[-1])
        times.append((time.perf_counter() - t) * 1e3 / iters)
        del outs
    return statistics.median(times)


def compared_step_key(row: Mapping[str, Any], base: Mapping[str, Any] | None) -> str:
    """Which of a row's step times a figure compares with its baseline row (None: no baseline):
    the loop step (`back_to_back_ms`, the step as a denoising loop runs it) where both have it,
    else the synchronised call's."""
    both = "loop_step_ms" in row and (base is None or "loop_step_ms" in base)
    return "loop_step_ms" if both else "step_ms"


def step_times(call: Callable[[], Any], *, iters: int, warmup: int, sync: Callable[[Any], Any]) -> tuple[float, float]:
    """(synchronised ms, back-to-back ms) of a whole step: `wall_ms`, then `back_to_back_ms`."""
    return (wall_ms(call, iters=iters, warmup=warmup, sync=sync),
            back_to_back_ms(call, iters=iters, warmup=0, sync=sync))


# ------------------------------------------------------------------------------------ command line
def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A bench's parser whose --help is its module docstring `doc`: the first line the description,
    the rest the epilog as written."""
    return argparse.ArgumentParser(description=doc.splitlines()[0], epilog="\n".join(doc.splitlines()[1:]),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


# ------------------------------------------------------------------------------------ variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """One entry of a bench's registry. `requires`: modules the worker imports (a missing one
    fails the variant with one clear line, before any work); `group`: variants of one group run
    in one process (e.g. eager and compiled torch share one model), default the variant itself;
    `options`: read by the bench's worker (implementation names, flags)."""

    name: str
    doc: str
    requires: tuple[str, ...] = ()
    group: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def process(self) -> str:
        return self.group or self.name


class MissingDependency(RuntimeError):
    pass


def check_requires(variant: Variant) -> None:
    missing = [m for m in variant.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"variant {variant.name!r} needs {', '.join(missing)} (not importable here)")


def registry(*variants: Variant) -> dict[str, Variant]:
    return {v.name: v for v in variants}


def process_groups(variants: Mapping[str, Variant], names: Iterable[str]) -> dict[str, list[str]]:
    """Selected variant names by process group, in registry order."""
    groups: dict[str, list[str]] = {}
    chosen = set(names)
    for name, v in variants.items():
        if name in chosen:
            groups.setdefault(v.process, []).append(name)
    return groups


# ------------------------------------------------------------------------------------ isolation
def run_isolated(cmd: Sequence[str], *, timeout: float | None = None, env: Mapping[str, str] | None = None,
                 unset: Sequence[str] = (), label: str = "", capture: bool = False) -> Any:
    """Runs `cmd` (e.g. [sys.executable, "-m", "benchmarks.bench_x", "--worker", ...]) in its own
    process from the repository root and returns the JSON it passed to `emit`. On a timeout, a
    non-zero exit or no JSON: {"error": "..."} (the caller turns it into error rows). With
    `capture`, the child's output is kept and its tail goes into the error. `env` adds to this
    process's environment, `unset` removes names from it."""
    label = label or " ".join(cmd[-3:])
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    child_env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", **(env or {}))
    child_env[RESULT_ENV] = str(out)
    for name in unset:
        child_env.pop(name, None)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), child_env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(list(cmd), cwd=REPO, env=child_env, timeout=timeout,
                              capture_output=capture, text=True)
    except subprocess.TimeoutExpired:
        print(f"!! {label}: stopped after its {timeout:.0f} s timeout", flush=True)
        partial = out.read_text() if out.is_file() else ""
        # A worker that emits as it goes leaves what it finished: kept beside the error.
        return {"error": f"timeout {timeout:.0f} s", **({"partial": json.loads(partial)} if partial else {})}
    finally:
        text = out.read_text() if out.is_file() else ""
        out.unlink(missing_ok=True)
    tail = ((proc.stdout or "")[-1500:] + (proc.stderr or "")[-1500:]) if capture else ""
    if proc.returncode != 0:
        print(f"!! {label}: exit code {proc.returncode}", flush=True)
        return {"error": f"exit {proc.returncode}" + (f": {tail[-600:]}" if tail else "")}
    if not text:
        return {"error": "no result written" + (f": {tail[-600:]}" if tail else "")}
    return json.loads(text)


def run_each(module: str, variants: Mapping[str, Variant], names: Iterable[str], argv: Sequence[str], *,
             timeout: float | None, write: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Runs each named variant as `module`'s worker (`--worker NAME`, with `argv`) in its own
    process, one after another; returns name -> its JSON. A variant whose imports are missing, or
    whose process fails, gets a one-line {"error"} instead. Prints each result and calls
    write(results so far) after each, so that a run stopped midway keeps what it measured."""
    rows: dict[str, Any] = {}
    for name in names:
        try:
            check_requires(variants[name])
            rows[name] = run_isolated(worker_command(module, name, argv), timeout=timeout)
        except Exception as e:  # noqa: BLE001  (one variant's failure is a row, not the end of the run)
            rows[name] = {"error": " ".join(str(e).split())[:300]}
        print(name, json.dumps(rows[name]), flush=True)
        write(rows)
    return rows


def emit(result: Any) -> None:
    """In a child started by run_isolated: hand `result` (JSON-able) back to the parent (a later
    call replaces an earlier one: a worker may emit what it has so far, which the parent keeps as
    "partial" if the worker then times out). Run directly (no parent), it is printed."""
    path = os.environ.get(RESULT_ENV)
    text = json.dumps(result, default=_json_default)
    if path:
        Path(path).write_text(text)
    else:
        print(text)


def worker_command(module: str, worker: str, argv: Sequence[str]) -> list[str]:
    """The command that reruns `module` as the worker `worker` with the parent's own arguments."""
    return [sys.executable, "-m", module, *argv, "--worker", worker]


def error_rows(names: Iterable[str], error: str, **keys) -> list[dict]:
    return [dict(variant=n, **keys, error=error) for n in names]


def device_info() -> dict:
    """The accelerator's name and the jax version, asked of a short child process (a parent that
    only starts children never initialises a jax backend, so it holds no GPU memory meanwhile)."""
    got = run_isolated([sys.executable, "-c", "import jax; from benchmarks import harness; harness.emit({"
                        "'device': jax.devices()[0].device_kind + ' (' + jax.default_backend() + ')', "
                        "'jax': jax.__version__})"], timeout=120, label="device query", capture=True)
    return got if "device" in got else {"device": "unknown device"}


def run_pytest(path: str, marker_or_k: str = "", *, timeout: float = 600) -> str:
    """Runs `pytest -q path [-k ...]` in a child; returns its last summary line."""
    select = ["-k", marker_or_k] if marker_or_k else []
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, *select],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"pytest {path}: timeout {timeout:.0f} s"
    print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
    lines = proc.stdout.strip().splitlines()
    return f"`pytest {path} {' '.join(select)}`: " + (lines[-1] if lines else f"rc={proc.returncode}")


# ------------------------------------------------------------------------------------ profiles
NCU_SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "WarpStateStats",
                "Occupancy", "LaunchStats", "SchedulerStats")


def run_ncu(code: str, kernel_regex: str, launch_count: int, out_path: str, *,
            sections: Sequence[str] = NCU_SECTIONS, metrics: Sequence[str] = (), timeout: float = 400) -> dict:
    """Nsight Compute on `python -c code`: the first `launch_count` kernels whose name matches
    `kernel_regex`, clocks left alone (device/METHOD.md). Writes ncu's text report to out_path and
    prints its tail; returns {"returncode", "file"} for the results log."""
    found = glob.glob("/usr/local/cuda*/bin/ncu") + glob.glob("/opt/nvidia/nsight-compute/*/ncu")
    ncu = shutil.which("ncu") or next(iter(found), "ncu")
    cmd = [ncu, "--clock-control", "none", "--kernel-name", f"regex:{kernel_regex}", "--launch-count",
           str(launch_count), *[a for s in sections for a in ("--section", s)],
           *([] if not metrics else ["--metrics", ",".join(metrics)]), sys.executable, "-c", code]
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
        text, returncode = r.stdout + r.stderr[-3000:], r.returncode
    except subprocess.TimeoutExpired as e:  # what it printed so far, and a failed attempt
        text = (e.stdout or b"").decode(errors="replace") + f"\nncu: stopped after {timeout:.0f} s\n"
        returncode = -1
    with open(out_path, "w") as f:
        f.write(text)
    print(text[-12000:], flush=True)
    return {"returncode": returncode, "file": os.path.basename(out_path)}


def parse_ncu(text: str) -> list[dict]:
    """ncu's text report -> one {"kernel": name, metric name: value} per profiled launch, in
    order; values as printed (numbers without thousands separators, else the string)."""
    kernels = []
    for line in text.splitlines():
        header = re.match(r"^  (\S+) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)", line)
        if header:
            kernels.append({"kernel": header.group(1)})
            continue
        row = re.match(r"^    (\S.*?\S)\s{2,}(\S+)?\s+([-\d.,]+)$", line)
        if kernels and row and not row.group(1).startswith("-"):
            value = row.group(3).replace(",", "")
            kernels[-1].setdefault(row.group(1), float(value) if re.fullmatch(r"-?[\d.]+", value) else value)
    return kernels


# ------------------------------------------------------------------------------------ grids
def time_grid(shapes: Mapping[str, Mapping[str, int]], variant: str,
              setup: Callable[[Mapping[str, int]], tuple[Callable, Callable, int]],
              metric: Callable[[Mapping[str, int], float], Mapping[str, float]] | None = None,
              *, deadline: float | None = None) -> list[dict]:
    """One row per named shape for one implementation: setup(dims) -> (fn, make_args, out_bytes),
    timed by device_time_ms; metric(dims, ms) adds derived figures (GB/s, TOP/s). A cell that
    fails (a config that does not compile is a result) becomes a row with `error`; past
    `deadline` (time.time()) no new cell starts."""
    rows = []
    for name, dims in shapes.items():
        row = {"variant": variant, "shape": name, **dims}
        if deadline is not None and time.time() > deadline:
            rows.append({**row, "error": "not run: budget spent"})
            continue
        try:
            fn, make_args, out_bytes = setup(dims)
            ms = device_time_ms(fn, make_args, out_bytes)
        except Exception as e:  # noqa: BLE001  (recorded, the other cells still run)
            rows.append({**row, "error": f"{type(e).__name__}: {e}"[:400]})
            print(f"  {variant} {name}: {rows[-1]['error'][:200]}", flush=True)
            continue
        row["ms"] = ms
        if metric:
            row.update(metric(dims, ms))
        rows.append(row)
        print(f"  {variant} {name}: {ms * 1e3:.1f} us " + " ".join(
            f"{k} {v:.0f}" for k, v in row.items() if k.endswith(("_gbs", "gbs", "tops")) and isinstance(v, float)),
            flush=True)
    return rows


# ------------------------------------------------------------------------------------ results
def run_meta(device: str | None = None, *, probe: bool = False) -> dict:
    """Where and from what a run came: device, jax version, commit, UTC time, host. `probe`: ask
    a child process for the device and the jax version (see device_info)."""
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "python": platform.python_version()}
    try:
        git = functools.partial(subprocess.run, cwd=REPO, capture_output=True, text=True, timeout=10)
        meta["commit"] = git(["git", "rev-parse", "--short", "HEAD"]).stdout.strip() or None
        # a tree that is not its HEAD (edits not committed; on the lent GPU machine, a copied tree
        # beside a stale .git) must not pass for that commit
        if meta["commit"] and git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip():
            meta["commit"] += "+changes"
    except (OSError, subprocess.SubprocessError):
        meta["commit"] = None
    if probe:
        meta.update(device_info())
        return meta
    if device is None and "jax" in sys.modules:
        import jax

        device = jax.devices()[0].device_kind
    if "jax" in sys.modules:
        meta["jax"] = sys.modules["jax"].__version__
    meta["device"] = device
    return meta


def figure(variant: str, figure: str, *, shape: str = "", baseline: str | None = None,
           ratio: float | str | None = None, note: str = "") -> dict:
    """One headline entry of a results file's `summary` (a row of README's Measured table).
    `ratio`: this variant against `baseline`, both from the same run (higher is better)."""
    if isinstance(ratio, float):
        ratio = f"{ratio:.2f}x"
    return {"variant": variant, "shape": shape, "figure": figure, "baseline": baseline, "ratio": ratio, "note": note}


def write_results(name: str, data: Mapping[str, Any], markdown: str | Sequence[str], out_dir: Path = RESULTS, *,
                  summary: Sequence[Mapping] = (), meta: Mapping | None = None,
                  plot: Callable[[Path], None] | None = None, command: str | None = None) -> Path:
    """Writes out_dir/<name>.json and <name>.md (and <name>.png through `plot(path)`); returns the
    JSON path. The JSON: {"bench", "schema", "meta", "device", "summary", **data}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or run_meta())
    payload = {"bench": name, "schema": SCHEMA, "meta": meta, "device": meta.get("device"),
               "summary": list(summary), **data}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    lines = [markdown] if isinstance(markdown, str) else list(markdown)
    where = ", ".join(f"{k} {meta[k]}" for k in ("device", "jax", "commit", "date") if meta.get(k))
    footer = ["", f"Run: {where}." + (f" Command: `{command}`." if command else ""),
              f"Data: `{name}.json` (written with this file by benchmarks/harness.py)."]
    (out_dir / f"{name}.md").write_text("\n".join(lines + footer) + "\n")
    if plot is not None:
        try:
            plot(out_dir / f"{name}.png")
        except ImportError:
            pass
    if out_dir.resolve() == RESULTS.resolve():  # README's Measured table follows the results
        try:
            update_readme()
        except (OSError, ValueError) as e:
            print(f"README's Measured table not regenerated ({e}); run `python -m benchmarks.report`", flush=True)
    return path


def run_stages(stages: Mapping[str, Callable[[Path, dict, Any], None]], names: Sequence[str], out: Path,
               log: dict, args: Any, save: Callable[[], Path]) -> None:
    """Runs the kernel benches' named stages (`tests`, `bench`, `sweep`, ...) in order, each
    `stages[name](out, log, args)` adding to `log`: a stage that raises leaves its traceback in
    `log[name + "_error"]` and the others run on; `save()` writes the results after every stage,
    so a run stopped from outside keeps the stages it finished."""
    for name in names:
        t = time.time()
        print(f"=== {name} ===", flush=True)
        try:
            stages[name](out, log, args)
        except Exception:  # noqa: BLE001  (keep the other stages' results)
            log[f"{name}_error"] = traceback.format_exc()[-3000:]
            print(log[f"{name}_error"], flush=True)
        log[f"{name}_seconds"] = time.time() - t
        print(save().with_suffix(".md").read_text(), flush=True)  # the tables so far


def stage_parser(doc: str, *, budget_s: float, tests_k: str = "") -> argparse.ArgumentParser:
    """The command line of a stage-based kernel bench (`run_stage_bench`): --out (default $OUT, else
    benchmarks/results), --stages, --tests-k, --budget-s, --variant-timeout and the workers' hidden
    --worker and --deadline; the bench adds its own (--variants, shapes, ...)."""
    p = argument_parser(doc)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS)))
    p.add_argument("--stages", default="tests,bench")
    p.add_argument("--tests-k", default=tests_k, help="pytest -k selection for the tests stage")
    p.add_argument("--budget-s", type=float, default=budget_s, help="start no new measurement after this many seconds")
    p.add_argument("--variant-timeout", type=float, default=400, help="seconds each worker process may run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def run_stage_bench(name: str, module: str, stages: Mapping[str, Callable[[Path, dict, Any], None]],
                    argv: Sequence[str], args: Any, markdown: Callable[[dict], Sequence[str]],
                    summary: Callable[[dict], Sequence[Mapping]], log: Mapping | None = None) -> None:
    """The parent of a stage-based kernel bench (`stage_parser`'s arguments): the workers get the
    parent's arguments and a deadline `args.budget_s` from now (`args.argv`); `run_stages` runs
    `args.stages` into the log (`log`: results to start from), writing <name>.{json,md} under
    `args.out` (markdown(log), summary(log)) after every stage."""
    args.argv = [*argv, "--deadline", str(time.time() + args.budget_s)]
    args.out.mkdir(parents=True, exist_ok=True)
    log = {"iters": timing_iters(), **(log or {})}
    meta = run_meta(probe=True)

    def save() -> Path:
        return write_results(name, log, markdown(log), args.out, summary=summary(log), meta=meta,
                             command="python -m " + module + " " + " ".join(argv))

    run_stages(stages, args.stages.split(","), args.out, log, args, save)


def worker_stage(module: str, worker: str) -> Callable[[Path, dict, Any], None]:
    """A `run_stages` stage that runs the bench `module`'s `worker` in its own process (the
    parent's arguments, `args.argv`; `args.variant_timeout`) and keeps its rows, or its error,
    in log[worker]."""
    def stage(out_dir: Path, log: dict, args: Any) -> None:
        got = run_isolated(worker_command(module, worker, args.argv), timeout=args.variant_timeout, label=worker)
        log[worker] = [got] if isinstance(got, dict) else got
    return stage


def merge_runs(paths: Sequence[Path]) -> tuple[list[dict], dict]:
    """Rows of several results files of one bench (variant subsets run back to back on one
    machine) and the first file's meta, with the commits and dates of all of them."""
    runs = [load_results(p) for p in paths]
    meta = dict(runs[0]["meta"])
    for key in ("commit", "date"):
        values = list(dict.fromkeys(str(r["meta"].get(key)) for r in runs))
        meta[key] = values[0] if len(values) == 1 else " + ".join(values)
    return [row for r in runs for row in r["rows"]], meta



def pivot_table(rows: Sequence[Mapping], value: str, fmt: str = "{:.0f}", *, baseline: str | None = None,
                shape_cols: Sequence[str] = (), variants: Sequence[str] | None = None,
                ratio_of: Callable[[Mapping, Mapping], float] | None = None) -> list[str]:
    """Shapes down, variants across: `value` of each (shape, variant) row, then each variant's
    ratio to `baseline` in the same shape (ratio_of(row, base_row), default base ms / row ms)."""
    ok = [r for r in rows if "error" not in r]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    variants = list(variants or dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["shape"], r["variant"]): r for r in ok}
    ratio_of = ratio_of or (lambda r, b: b["ms"] / r["ms"])
    others = [v for v in variants if v != baseline] if baseline else []
    headers = [*(shape_cols or ["shape"]), *variants, *(f"{v} vs {baseline}" for v in others)]
    body = []
    for s in shapes:
        first = next(r for r in rows if r["shape"] == s)
        cells = [first.get(c, "") for c in shape_cols] if shape_cols else [s]
        for v in variants:
            r = cell.get((s, v))
            err = next((x["error"] for x in rows if x["shape"] == s and x["variant"] == v and "error" in x), None)
            cells.append(fmt.format(r[value]) if r and value in r else ("failed" if err else "-"))
        base = cell.get((s, baseline)) if baseline else None
        for v in others:
            r = cell.get((s, v))
            cells.append(f"{ratio_of(r, base):.2f}x" if r and base else "-")
        body.append(cells)
    numeric = [bool(shape_cols)] * len(shape_cols or ["shape"]) + [True] * (len(headers) - len(shape_cols or ["shape"]))
    table = md_table(headers, body, numeric)
    failed = [r for r in rows if "error" in r]
    if failed:
        table += ["", "Failed cells: " + "; ".join(f"{r['variant']} {r['shape']}: {r['error'][:160]}" for r in failed)]
    return table


def span(values: Iterable[float], fmt: str = "{:.0f}") -> str:
    """'a-b' over values (one value: 'a')."""
    vals = sorted(values)
    if not vals:
        return "-"
    lo, hi = fmt.format(vals[0]), fmt.format(vals[-1])
    return lo if lo == hi else f"{lo}-{hi}"


def bar_plot(path: Path, groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str,
             *, rotate: bool = False) -> None:
    """Grouped bars (groups on x, one bar per series); needs matplotlib (ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(groups) * max(len(series), 1) ** 0.5 + 4), 4.5))
    width = 0.8 / max(len(series), 1)
    for i, (label, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups,
                  rotation=75 if rotate else 0, ha="right" if rotate else "center", fontsize=7 if rotate else 9)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)
