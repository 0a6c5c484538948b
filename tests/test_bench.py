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
