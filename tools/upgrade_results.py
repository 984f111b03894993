"""Converts benchmarks/results/*.json written before benchmarks/harness.py (no "schema") to the
harness's format, in place, keeping every measured value:

- every file gets the envelope: bench, schema, meta (device, jax, date, and the commit that
  recorded the file), summary (the README figures, computed by the bench's own `summarize`);
- rotate_quantize / w4a4_matmul: their wide rows (one row per shape, a key per implementation)
  become the harness's long rows (one per implementation x shape), implementations under the
  benchmark's current names (sm90 -> pallas, the removed Pallas Triton kernel -> triton);
- e2e: the latest complete run (run_e) becomes `rows`; the older runs stay under their keys.
The markdown tables next to them are left as they are (they carry each run's notes).

    PYTHONPATH=. python3 tools/upgrade_results.py [benchmarks/results]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import bench_convert, bench_e2e, bench_quality, bench_rotate_quantize, bench_w4a4_matmul, harness
from tools import gpu_check_pipeline

RQ_NAMES = {"sm90": "pallas", "sm90_packed": "pallas_packed", "triton": "triton", "xla": "xla", "copy": "copy"}
RQ_BYTES = {"sm90": "bytes_int8", "sm90_packed": "bytes_packed", "triton": "bytes_int8", "xla": "bytes_int8",
            "copy": "copy_bytes"}
W4_NAMES = {"bf16": "xla_bf16", "int8": "xla_int8", "kernel": "pallas", "naive_layer": "xla_w4a4_layer",
            "layer": "pallas_w4a4_layer"}


def _commit(path: Path) -> str | None:
    out = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(path)], cwd=harness.REPO, capture_output=True,
                         text=True).stdout.strip()
    return out or None


def _date(*notes) -> str | None:
    for note in notes:
        m = re.search(r"20\d\d-\d\d-\d\d(?:,? ~?\d\d:\d\d(?: UTC)?)?", str(note or ""))
        if m:
            return m.group(0)
    return None


def _meta(path: Path, data: dict, **extra) -> dict:
    return {"device": data.get("device"), "jax": data.get("jax"), "commit": _commit(path), "host": None,
            "date": _date(data.get("run"), data.get("note")), "converted_by": "tools/upgrade_results.py", **extra}


def rotate_quantize(data: dict) -> dict:
    rows = []
    for r in data.pop("rows"):
        for old, new in RQ_NAMES.items():
            if f"{old}_ms" in r:
                rows.append({"variant": new, "shape": f"M={r['m']} K={r['k']}", "m": r["m"], "k": r["k"],
                             "ms": r[f"{old}_ms"], "bytes": r[RQ_BYTES[old]], "gbs": r[f"{old}_gbs"]})
    prologue = []
    for p in data.pop("prologue", []):
        name = f"{p['prologue']} M={p['m']} K={p['k']}"
        for key, new in (("sm90_ms", "pallas"), ("kernel_ms", "triton"), ("xla_prologue_only_ms", "xla_prologue_only"),
                         ("xla_full_ms", "xla_full")):
            if key in p:
                prologue.append({"variant": new, "shape": name, "m": p["m"], "k": p["k"], "ms": p[key]})
    data.update(rows=rows, prologue=prologue,
                renamed="sm90 -> pallas (the Mosaic GPU kernel, now pallas_kernels/rotate_quantize.py); "
                        "triton: the removed Pallas Triton kernel")
    return data


def w4a4_matmul(data: dict) -> dict:
    rows = []
    for r in data.pop("bench"):
        for old, new in W4_NAMES.items():
            if f"{old}_ms" in r:
                row = {"variant": new, "shape": f"M={r['m']} K={r['k']} N={r['n']}", "m": r["m"], "k": r["k"],
                       "n": r["n"], "ms": r[f"{old}_ms"], "tops": r[f"{old}_tops"]}
                if new == "pallas" and "config" in r:
                    row["config"] = r["config"]
                rows.append(row)
    data["rows"] = rows
    return data


def upgrade(path: Path) -> bool:
    data = json.loads(path.read_text())
    if data.get("schema") == harness.SCHEMA:
        return False
    name = path.stem
    if name == "rotate_quantize":
        data = rotate_quantize(data)
        summary = bench_rotate_quantize.summarize(data["rows"])
    elif name == "w4a4_matmul":
        data = w4a4_matmul(data)
        summary = bench_w4a4_matmul.summarize(data["rows"])
    elif name == "e2e":
        data["rows"] = data.pop("run_e")
        data["rows_are"] = "run E (2026-11-25, ~03:30 UTC, one device call); older runs under run_a .. run_d"
        data["run"] = "2026-11-25 ~03:30 UTC"
        summary = bench_e2e.summarize(data["rows"])
    elif name == "quality":
        summary = bench_quality.summarize(data["per_layer"], data.get("end_to_end"))
    elif name == "convert":
        summary = bench_convert.summarize(data)
        data["device"] = data.get("where")
    elif name == "pipeline":
        data["device"] = next((r.get("device") for r in data["variants"].values() if "device" in r), None)
        data["jax"] = next((r.get("jax") for r in data["variants"].values() if "jax" in r), None)
        summary = gpu_check_pipeline.summarize(data["variants"])
    else:
        summary = []
    meta = _meta(path, data)
    if name == "convert":
        meta["commit"] = data.get("measured_at_commit") or meta["commit"]
    payload = {"bench": name, "schema": harness.SCHEMA, "meta": meta, "device": meta["device"], "summary": summary,
               **{k: v for k, v in data.items() if k != "device"}}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return True


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else harness.RESULTS
    for path in sorted(folder.glob("*.json")):
        print(f"{path.name}: {'converted' if upgrade(path) else 'already schema ' + str(harness.SCHEMA)}")


if __name__ == "__main__":
    main()
