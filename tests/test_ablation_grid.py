"""The Ablation page's pure grid logic: sweepable fields, slider stops, and matching stored runs to a grid."""

from __future__ import annotations

from types import SimpleNamespace

from app import ablation
from ferd.config import Config, to_dict
from ferd.experiments import ablation_configs


def _run(cfg: Config, status: str = "finished", **overrides) -> SimpleNamespace:
    return SimpleNamespace(config={**to_dict(cfg), **overrides}, status=status)


def test_every_numeric_experiment_field_is_sweepable_with_sorted_stops_including_the_preset_value():
    assert {"utae_weight", "w_bn", "w_uni", "epochs", "eps", "lr_student"} <= set(ablation.SWEEPABLE)
    assert "seed" not in ablation.SWEEPABLE and "num_threads" not in ablation.SWEEPABLE
    assert "λ_u" in ablation.label("utae_weight") and ablation.label("memory_size") == "memory_size"
    cfg = Config()
    for field in ablation.SWEEPABLE:
        stops = ablation.candidate_values(field, float(getattr(cfg, field)))
        assert stops == sorted(set(stops)) and len(stops) >= 3, field
        assert float(getattr(cfg, field)) in stops, field
        if ablation.is_int(field):
            assert all(float(v).is_integer() for v in stops), field
    assert ablation.candidate_values("lr_generator", 0.002) == [0.0002, 0.0004, 0.001, 0.002, 0.004, 0.01, 0.02]
    assert ablation.candidate_values("generator_steps", 20) == [2, 4, 10, 20, 40, 100, 200]
    assert ablation.between([0, 1, 2, 5, 10], 1, 5) == [1, 2, 5]


def test_match_grid_finds_the_forms_grid_only():
    base = Config(epochs=3)
    grid = ablation_configs(base, "w_uni", [0.0, 2.0], [0, 1])
    other_epochs = ablation_configs(base.replace(epochs=5), "w_uni", [0.0, 2.0], [0])  # the previous grid
    other_value = ablation_configs(base, "w_uni", [5.0], [0])
    runs = [_run(c) for c in grid[:3]] + [_run(c) for c in other_epochs + other_value]
    runs.append(_run(grid[3], device="cpu", num_threads=1))  # where it ran does not matter
    assert ablation.match_grid(grid, runs) == runs[:3] + runs[-1:]
    assert ablation.match_grid(other_epochs, runs) == runs[3:5]
    records = [{"config": r.config} for r in runs]  # results records (e.g. a reference pack) match the same way
    assert len(ablation.match_grid(grid, records, config_of=lambda r: r["config"])) == 4


def test_unqueued_skips_points_with_a_live_or_finished_run_but_not_failed_ones():
    grid = ablation_configs(Config(epochs=3), "utae_weight", [0.0, 10.0, 20.0], [0])
    runs = [_run(grid[0], "finished"), _run(grid[1], "failed"), _run(grid[2], "queued")]
    assert ablation.unqueued(grid, runs) == [grid[1]]
