"""`bench --json`: one JSON line with counted FLOPs and the same-process matmul speed (slow: a real run)."""

from __future__ import annotations

import json

import pytest

from ferd import cli


@pytest.mark.slow
def test_bench_json_prints_counted_flops_and_the_matmul_reference(capsys):
    assert cli.main(["bench", "--preset", "smoke", "--epochs", "2", "--json", "--set", "num_threads=1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["threads"] == 1 and result["epochs"] == 2
    assert result["flops_per_epoch"] > 1e6 and result["seconds_per_epoch"] > 0 and result["matmul_gflops"] > 0
    assert result["achieved_gflops"] == pytest.approx(result["flops_per_epoch"] / result["seconds_per_epoch"] / 1e9)
    # Two timed runs: the process's first (cold) one, and the warm one the per-epoch figures come from.
    assert result["seconds_per_epoch"] == pytest.approx(result["run_s"] / 2)
    assert result["cold_seconds_per_epoch"] == pytest.approx(result["cold_run_s"] / 2)
    assert 0 < result["first_event_s"] < result["cold_run_s"]
    # The profiled pass: the counted ops fill part of the run, so alone they run faster than the whole run.
    assert 0 < result["counted_ops_share"] < 1
    assert result["counted_ops_gflops"] > result["achieved_gflops"]
    assert result["counted_ops_seconds_per_epoch"] < result["seconds_per_epoch"]
    fraction = result["counted_ops_gflops"] / result["matmul_gflops"]
    assert result["counted_ops_matmul_fraction"] == pytest.approx(fraction)


def test_counted_ops_are_the_convolutions_and_matmuls_flop_counter_mode_counts():
    from ferd.bench import is_counted_op

    for name in ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
                 "aten::addmm", "aten::mm", "aten::bmm"):
        assert is_counted_op(name)
    for name in ("aten::relu", "aten::native_batch_norm", "aten::max_pool2d_with_indices", "aten::mul",
                 "aten::copy_", "aten::threshold_backward", "aten::_convert_indices_from_coo_to_csr"):
        assert not is_counted_op(name)
