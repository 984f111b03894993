"""benchmarks.harness.parse_ncu: Nsight Compute's text report (an excerpt of a real one, two
kernels) read into one dict of metrics per profiled launch."""

from benchmarks import harness

REPORT = """\
==PROF== Profiling "flash_attention_int8_mosaic_gpu_kernel": 0%....50%....100% - 20 passes
[2618] python3.12@127.0.0.1
  flash_attention_int8_mosaic_gpu_kernel (1, 36, 24)x(384, 1, 1), Context 1, Stream 14, Device 0, CC 9.0
    Section: Command line profiler metrics
    --------------------------------------------------------------------------- ----------- ------------
    Metric Name                                                                 Metric Unit Metric Value
    --------------------------------------------------------------------------- ----------- ------------
    smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio           inst         2.47
    smsp__inst_executed.sum                                                            inst  155,007,304
    --------------------------------------------------------------------------- ----------- ------------
    Section: GPU Speed Of Light Throughput
    Duration                         us       359.20
    Block Size                                                   384
    Cluster Scheduling Policy                           PolicySpread
  flash_attention_sage8_mosaic_gpu_kernel (1, 36, 24)x(384, 1, 1), Context 1, Stream 14, Device 0, CC 9.0
    Duration                         us       306.98
"""


def test_parse_ncu_reads_each_launch_metrics():
    int8, sage8 = harness.parse_ncu(REPORT)
    assert int8 == {"kernel": "flash_attention_int8_mosaic_gpu_kernel",
                    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": 2.47,
                    "smsp__inst_executed.sum": 155007304.0, "Duration": 359.2, "Block Size": 384.0}
    assert sage8 == {"kernel": "flash_attention_sage8_mosaic_gpu_kernel", "Duration": 306.98}
    assert harness.parse_ncu("==PROF== no kernels profiled\n") == []
