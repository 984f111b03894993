"""benchmarks.step_trace: the timeline arithmetic on hand-made kernel intervals, the kernel
families, the host-call phases, and a CPU trace (no GPU plane) refused by name."""

from pathlib import Path

import pytest

from benchmarks import step_trace


def test_bursts_split_at_long_idle_only():
    kernels = [(0, 10, "a"), (12, 20, "b"), (5000, 5010, "c"), (5011, 5020, "d")]
    assert [len(b) for b in step_trace.bursts(kernels, split_ns=1000)] == [2, 2]
    assert [len(b) for b in step_trace.bursts(kernels, split_ns=10_000)] == [4]
    # a kernel that ends after a later one started keeps the burst open until its end
    assert [len(b) for b in step_trace.bursts([(0, 3000, "a"), (10, 20, "b"), (2500, 2600, "c")], 1000)] == [3]


def test_busy_is_the_union_of_the_intervals():
    assert step_trace.busy_ns([(0, 10, "a"), (20, 30, "b")]) == 20
    assert step_trace.busy_ns([(0, 10, "a"), (5, 15, "b"), (7, 9, "c")]) == 15  # overlaps count once
    assert step_trace.busy_ns([]) == 0


def test_burst_stats_charge_idle_to_the_transition_after_it():
    burst = [(0, 1_000_000, "rotate_quantize_mosaic_gpu_kernel"), (1_500_000, 3_000_000, "kernel_mosaic_gpu_kernel"),
             (3_000_000, 4_000_000, "loop_add_fusion.12"), (6_000_000, 7_000_000, "rotate_quantize_mosaic_gpu_kernel")]
    s = step_trace.burst_stats(burst)
    assert s["kernels"] == 4
    assert s["span_ms"] == pytest.approx(7.0)
    assert s["busy_ms"] == pytest.approx(4.5)
    assert s["idle_ms"] == pytest.approx(2.5)
    assert s["idle_by_transition"] == [("xla:loop_add_fusion -> rotate_quantize", pytest.approx(2.0), 1),
                                       ("rotate_quantize -> w4a4_gemm", pytest.approx(0.5), 1)]
    assert s["time_by_kind"] == [("rotate_quantize", pytest.approx(2.0), 2), ("w4a4_gemm", pytest.approx(1.5), 1),
                                 ("xla:loop_add_fusion", pytest.approx(1.0), 1)]


@pytest.mark.parametrize("name,kind", [
    ("kernel_mosaic_gpu_kernel", "w4a4_gemm"),  # the kinds of the breakdown's stages take its names
    ("lora_down_mosaic_gpu_kernel", "lora_down"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("nvjet_sm90_tss_192x64_64x6_1x2_h_bz_NNT", "cublas_gemm"),
    ("gemm_fusion_dot.19", "cublas_gemm"),
    ("Memset 0", "Memset"),
    ("input_scatter_fusion_19", "xla:input_scatter_fusion"),
    ("fusion.1670", "xla:fusion"),
])
def test_kernel_kind(name, kind):
    assert step_trace.kernel_kind(name) == kind


def test_host_calls_keep_the_calls_that_run_a_step():
    host = [(0, 100, "PjitFunction(jit(step))"), (1, 99, "PjitFunction(jit(step))"), (2, 12, "ParseArguments"),
            (20, 30, "Thunks::Prepare"), (200, 210, "PjitFunction(jit(other))")]
    kernels = [(40, 80, "k"), (205, 209, "small")]
    calls = step_trace.host_calls(host, kernels, step_starts=[40])
    assert len(calls) == 1
    assert calls[0]["phases_ms"]["ParseArguments"] == pytest.approx(10e-6)
    assert calls[0]["phases_ms"]["Thunks::Prepare"] == pytest.approx(10e-6)
    assert calls[0]["to_first_kernel_ms"] == pytest.approx(40e-6)


def test_a_trace_without_gpu_is_refused_by_name(tmp_path):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: jnp.sin(x) * 2)
    x = jnp.ones((64,))
    path = step_trace.capture(lambda: f(x).block_until_ready(), tmp_path / "cpu.xplane.pb", steps=1)
    assert path.is_file() and path.parent == tmp_path
    with pytest.raises(ValueError, match=r"cpu\.xplane\.pb: no /device:GPU plane"):
        step_trace.analyze(Path(path))
