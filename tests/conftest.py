"""Shared pytest setup: float32 matmuls at full precision on the CPU, the `gpu` marker, and one
JAX compilation cache for the whole run."""

import functools
import os
import shutil
import signal
import tempfile

# Mosaic GPU interpret mode runs each warpgroup as XLA CPU code that waits on barriers in host
# callbacks. With XLA's concurrency-optimized CPU scheduler, the W4A4 kernel's chained pipelines
# (three pipeline call sites or more) hung on the 2-core CI machine with two warpgroups waiting on
# barriers; without it they run. Set before jax starts its CPU backend.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_concurrency_optimized_scheduler=false"]).strip()

# JAX's persistent compilation cache in a folder of this run (unless one is given): the xdist
# workers and the tests' subprocesses compile the same small models, initializers and interpreted
# kernels over and over, and each compilation now happens once per run. Entries are keyed by the
# program and compile options, so no test sees another program's executable. No size limit: with
# one, every write scans the whole folder under a file lock (thousands of entries here). An entry
# read while another process writes it fails to decompress, and JAX compiles instead. xdist's
# workers and subprocesses inherit the environment; jax reads it when imported.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="convrot-jax-test-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax
import pytest


def pytest_unconfigure(config):
    if _OWN_CACHE:  # the process that made the folder: xdist's controller, or the only one
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@functools.cache
def _on_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", None) == "9.0"


def pytest_collection_modifyitems(config, items):
    if _on_hopper():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA Hopper (sm_90) GPU: run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, as an interactive command has
    it: a process a non-interactive shell starts in the background (`cmd &`) inherits SIGINT
    ignored, and Python then leaves it ignored. Tests of what Ctrl-C does outside
    `interrupts.raising()` assume the default handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
