"""Where a KV step of the attention kernel goes, from Mosaic GPU's in-kernel profiler.

`attention_quantized(profile_dir=...)` makes each warpgroup's first thread store a clock stamp
where a named scope of the kernel opens and closes (`_kernel`'s kv_step: ks_wait, qk_issue,
qk_schedule, qk_wait, softmax, pv_gate, pv, update; the producer's k_free_wait, v_free_wait).
`capture` keeps the raw stamps (the trace file Mosaic GPU writes shifts each warpgroup to its own
first stamp, which loses how the two compute warpgroups line up); `summarize` turns them into
per-scope cycles a step, what the other compute warpgroup does meanwhile, and how busy the SMs
are over the launch (the last wave of CTAs).

Scopes are clock reads between instructions: ptxas may move arithmetic across them (it moves
part of the softmax past its arrive, notes/attention.md v12), so a scope's cycles are where its
warp was when the stamps ran, not the exact cost of the code written inside it. And the stamps
change the kernel: a profiled launch took 1.85x the plain one's device time on the H200, and an
arrive moved earlier ran 10% fewer cycles a step profiled but no faster plain (notes v16). Read
the split as where the warps wait, not as a prediction of what a change gains.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from typing import Iterator

import numpy as np

_HEADER = 3  # a trace's entries: start (globaltimer, ns), SM id, entries used, then (tag, clock) pairs
_EXIT = 1 << 31
_SKIP = 2  # steps left out at each end of a warpgroup's loop (pipeline fill and drain)


@contextlib.contextmanager
def capture() -> Iterator[list[dict]]:
    """Collects the raw profile buffer of every profiled kernel that finishes inside the block, in
    place of Mosaic GPU's dump (its trace file, ~100 bytes an event, ~300 MB at B=4 S=4608, stays
    empty)."""
    from jax.experimental.mosaic.gpu import profiler

    got: list[dict] = []
    original = profiler.ProfilerSpec.dump

    def dump(spec, buffer, f, grid, block):
        got.append(dict(buffer=np.asarray(buffer).copy(), names={v: k for k, v in spec.interned_names.items()},
                        entries=spec.entries_per_warpgroup, blocks=int(np.prod(grid)),
                        traces_per_block=int(np.prod(block)) // 128))
    profiler.ProfilerSpec.dump = dump
    try:
        yield got
    finally:
        profiler.ProfilerSpec.dump = original


def _scopes(trace: np.ndarray, names: dict[int, str]) -> list[tuple[str, int, int]]:
    """(name, start, end) clock stamps of one warpgroup's scopes, in the order they opened."""
    used = int(trace[2])
    events = trace[_HEADER:_HEADER + used].astype(np.int64).reshape(-1, 2)
    open_at: dict[str, int] = {}
    out = []
    for tag, clock in events:
        name = names[int(tag) & ~_EXIT]
        if tag & _EXIT:
            out.append((name, open_at.pop(name), int(clock)))
        else:
            open_at[name] = int(clock)
    return sorted(out, key=lambda s: s[1])


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Cycles during which an interval of a and one of b both run (each list sorted, disjoint)."""
    total, j = 0, 0
    for s0, e0 in a:
        while j < len(b) and b[j][1] <= s0:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e0:
            total += max(0, min(e0, b[k][1]) - max(s0, b[k][0]))
            k += 1
    return total


def summarize(raw: dict, compute_wgs: int = 2) -> dict:
    """Per-scope cycles a KV step of the compute warpgroups (median over the steps, the first and
    last `_SKIP` left out), the step's period, the producer's waits, the share of each compute
    scope's time the other compute warpgroup spends in each of its scopes, and SM occupancy."""
    buf = raw["buffer"].reshape(raw["blocks"], raw["traces_per_block"], raw["entries"])
    names = raw["names"]
    durations: dict[str, list[int]] = defaultdict(list)
    producer: dict[str, list[int]] = defaultdict(list)
    once: dict[str, list[int]] = defaultdict(list)
    periods: list[int] = []
    beside: dict[tuple[str, str], int] = defaultdict(int)
    scope_total: dict[str, int] = defaultdict(int)
    cta_cycles, cta_start_ns, cta_sm = [], [], []
    for block in buf:
        per_wg = [_scopes(t, names) for t in block]
        clocks = [c for scopes in per_wg for _, s, e in scopes for c in (s, e)]
        if not clocks:
            continue
        cta_cycles.append(max(clocks) - min(clocks))
        cta_start_ns.append(int(block[0][0]))
        cta_sm.append(int(block[0][1]))
        middle = []
        for wg, scopes in enumerate(per_wg):
            by_name = defaultdict(list)
            for name, s, e in scopes:
                by_name[name].append((s, e))
            kept = {}  # the loop's scopes, their first and last _SKIP steps left out
            for name, spans in by_name.items():
                if len(spans) <= 2 * _SKIP:  # outside the loop (e.g. Pallas's "Init")
                    once[name] += [e - s for s, e in spans]
                else:
                    kept[name] = spans[_SKIP:len(spans) - _SKIP]
                    (durations if wg < compute_wgs else producer)[name] += [e - s for s, e in kept[name]]
            if wg < compute_wgs:
                starts = [s for s, _ in by_name.get("qk_issue", [])]
                steps = np.diff(starts)[_SKIP:len(starts) - 1 - _SKIP] if len(starts) > 2 * _SKIP + 1 else []
                periods += [int(x) for x in steps]
                middle.append(kept)
        if len(middle) == 2:
            for me, other in ((middle[0], middle[1]), (middle[1], middle[0])):
                for a, spans_a in me.items():
                    scope_total[a] += sum(e - s for s, e in spans_a)
                    for b, spans_b in other.items():
                        beside[(a, b)] += _overlap(spans_a, sorted(spans_b))
    med = lambda xs: float(statistics.median(xs)) if xs else 0.0
    period = med(periods)
    scopes = {n: med(v) for n, v in durations.items()}
    return {
        "period_cycles": period,
        "scope_cycles": scopes,
        "unscoped_cycles": period - sum(scopes.values()),
        "producer_cycles": {n: med(v) for n, v in producer.items()},
        "once_cycles": {n: med(v) for n, v in once.items()},
        "beside": {f"{a}|{b}": v / scope_total[a] for (a, b), v in beside.items() if scope_total[a]},
        **_occupancy(cta_cycles, cta_start_ns, cta_sm),
    }


def _occupancy(cycles: list[int], start_ns: list[int], sm: list[int]) -> dict:
    """CTAs per SM and how busy the SMs are between the first CTA's start and the last one's end;
    the clock as cycles over the ns (globaltimer) between the starts of CTAs that follow one
    another on an SM (a profiled launch reads ~1.1 GHz on the H200 and runs 1.85x the plain
    kernel's device time: notes/attention.md v16)."""
    if not cycles:
        return {}
    counts = {"ctas": len(cycles), "sms": len(set(sm)), "ctas_per_sm_max": int(max(np.bincount(sm))),
              "cta_cycles_median": float(np.median(cycles))}
    start = np.array(start_ns, np.int64)
    start -= start.min()
    order = np.lexsort((start, np.array(sm)))
    ghz = [cycles[i] / (start[j] - start[i]) for i, j in zip(order[:-1], order[1:])
           if sm[i] == sm[j] and start[j] > start[i]]
    if not ghz:  # one CTA an SM: no clock to turn its cycles into time
        return counts
    clock = float(np.median(ghz))
    end = start + np.array(cycles) / clock
    span = float(end.max())
    busy = defaultdict(float)
    for s, e, m in zip(start, end, sm):
        busy[m] += e - s
    return {**counts, "clock_ghz": clock, "span_us": span / 1e3, "sm_busy": sum(busy.values()) / (counts["sms"] * span)}


def markdown(name: str, s: dict) -> list[str]:
    """A variant's summary as markdown lines."""
    period = s["period_cycles"] or 1
    rows = [f"| {n} | {c:.0f} | {100 * c / period:.0f}% |" for n, c in s["scope_cycles"].items()]
    rows.append(f"| (between scopes) | {s['unscoped_cycles']:.0f} | {100 * s['unscoped_cycles'] / period:.0f}% |")
    names = list(s["scope_cycles"])
    beside = [f"| {a} | " + " | ".join(f"{100 * s['beside'].get(f'{a}|{b}', 0):.0f}" for b in names) + " |"
              for a in names]
    return [
        f"### {name}", "",
        f"KV step period (a compute warpgroup, median): **{period:.0f} cycles**; {s.get('ctas')} CTAs on "
        f"{s.get('sms')} SMs (at most {s.get('ctas_per_sm_max')} an SM), a CTA {s.get('cta_cycles_median', 0):.0f} "
        f"cycles; " + (f"cycles per ns between CTA starts (globaltimer) {s['clock_ghz']:.2f}; launch span "
                       f"{s['span_us']:.1f} us, SMs busy {100 * s['sm_busy']:.1f}% of it." if "clock_ghz" in s else
                       "one CTA an SM: no clock, span or SM occupancy."), "",
        "| scope (compute warpgroup) | cycles a step | of the period |", "| --- | ---: | ---: |", *rows, "",
        "Producer waits a step (cycles): " + ", ".join(f"{n} {c:.0f}" for n, c in s["producer_cycles"].items())
        + "; once a warpgroup: " + ", ".join(f"{n} {c:.0f}" for n, c in s.get("once_cycles", {}).items()), "",
        "While this warpgroup is in the row's scope, the other compute warpgroup is in the column's (% of "
        "the row scope's time):", "",
        "| this \\ other | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names), *beside, ""]
