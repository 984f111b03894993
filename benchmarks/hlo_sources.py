"""What each kernel of a compiled XLA program is: the project source line its fusion came from.

A profile names XLA's kernels after their fusions (`loop_multiply_fusion_12`), which says nothing
about which part of the model made them. The compiled HLO text carries, for every instruction, a
stack frame id into tables of files, functions and lines (`FileNames`, `FunctionNames`,
`FileLocations`, `StackFrames`). This module reads them and names each fusion by the innermost
frame in this repository (e.g. `flux_flax/layers.py:146 modulate`,
`flux_flax/layers.py:219 GELU.__call__`), so a step's XLA time can be
accounted per source line instead of per anonymous fusion.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from benchmarks.report import REPO

_ROW = re.compile(r"^\s*(\d+)\s+(.*)$")
_FIELDS = re.compile(r"(\w+)=(\d+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\bstack_frame_id=(\d+)")
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def kernel_key(name: str) -> str:
    """The form both HLO instruction names and GPU kernel names reduce to (`.`/`-` -> `_`)."""
    return re.sub(r"[.\-]", "_", name)


def _tables(hlo_text: str) -> dict[str, dict[int, str]]:
    tables: dict[str, dict[int, str]] = {t: {} for t in _TABLES}
    current = None
    for line in hlo_text.splitlines():
        if line.strip() in _TABLES:
            current = line.strip()
            continue
        match = _ROW.match(line) if current else None
        if match:
            tables[current][int(match.group(1))] = match.group(2).strip().strip('"')
        elif current and line.strip():
            current = None
    return tables


def _fields(row: str) -> dict[str, int]:
    return {k: int(v) for k, v in _FIELDS.findall(row)}


def instruction_sources(hlo_text: str, root: str = str(REPO)) -> dict[str, str]:
    """{kernel_key(instruction name): "path/under/root.py:line function"} for every instruction
    with a stack frame that passes through a file under `root`; the innermost such frame wins."""
    tables = _tables(hlo_text)
    files, functions = tables["FileNames"], tables["FunctionNames"]
    locations = {k: _fields(v) for k, v in tables["FileLocations"].items()}
    frames = {k: _fields(v) for k, v in tables["StackFrames"].items()}
    prefix = root.rstrip("/") + "/"

    def source(frame_id: int) -> str | None:
        seen = set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            location = locations.get(frames[frame_id].get("file_location_id", -1), {})
            path = files.get(location.get("file_name_id", -1), "")
            if path.startswith(prefix) and "/site-packages/" not in path:
                function = functions.get(location.get("function_name_id", -1), "?")
                return f"{path[len(prefix):]}:{location.get('line', 0)} {function}"
            parent = frames[frame_id].get("parent_frame_id", 0)
            if parent == frame_id:
                break
            frame_id = parent
        return None

    out = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            where = source(int(match.group(2)))
            if where:
                out.setdefault(kernel_key(match.group(1)), where)
    return out


def time_by_source(timings: Iterable[tuple[str, float]], sources: Mapping[str, str]) -> dict[str, tuple[float, int]]:
    """Sums kernel launches' times by source line: {source: (ms, launches)}, longest first;
    kernels with no known source are grouped by their name without its trailing number."""
    out: dict[str, tuple[float, int]] = {}
    for name, ms in timings:
        key = kernel_key(name)
        where = sources.get(key) or f"(no source) {re.sub(r'_?\d+$', '', key)}"
        total, count = out.get(where, (0.0, 0))
        out[where] = (total + ms, count + 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))
