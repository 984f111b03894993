"""Shared pytest setup: float32 matmuls at full precision on the CPU, and the `gpu` marker."""

import functools
import os

# Mosaic GPU interpret mode runs each warpgroup as XLA CPU code that waits on barriers in host
# callbacks. With XLA's concurrency-optimized CPU scheduler, the W4A4 kernel's chained pipelines
# (three pipeline call sites or more) hung on the 2-core CI machine with two warpgroups waiting on
# barriers; without it they run. Set before jax starts its CPU backend.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_concurrency_optimized_scheduler=false"]).strip()

import jax
import pytest


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
