"""Run labels: the preset a run started from (recorded, or inferred for older runs), method, seed, epochs, time."""

import torch

from ferd import engine
from ferd.config import Config, from_dict, load_preset, to_dict
from ferd.labels import is_quick, preset_of, run_label, started_at


def test_load_preset_records_its_name_and_overrides_keep_it():
    assert load_preset("smoke").preset == "smoke"
    assert load_preset("digits", seed=3).preset == "digits"
    assert load_preset("smoke").for_method("dfrd").preset == "smoke"


def test_preset_of_an_old_config_is_inferred_from_schedule_and_teacher():
    old_smoke = {k: v for k, v in to_dict(load_preset("smoke")).items() if k != "preset"}
    old_digits = {k: v for k, v in to_dict(load_preset("digits")).items() if k != "preset"}
    assert from_dict(old_smoke).preset == ""  # a config stored before the field loads
    assert preset_of(old_smoke) == "smoke" and is_quick(old_smoke)
    assert preset_of(old_digits) == "digits" and not is_quick(old_digits)
    assert preset_of(to_dict(Config(dataset="svhn", epochs=7))) == "svhn"


def test_run_label_tells_runs_apart():
    cfg = to_dict(load_preset("smoke", seed=2).for_method("dfrd"))
    label = run_label("20261129-224551-653cb9", cfg)
    assert label == "smoke · dfrd · seed 2 · 3 ep · Nov 29 22:45:51"
    assert run_label("20261129-224551-653cb9", cfg, "mine").startswith("mine · smoke · dfrd")
    assert started_at("not-an-id") == "not-an-id"


def test_a_checkpoint_written_before_the_preset_field_still_resumes(tiny_cfg, tmp_path):
    """Old checkpoints store configs without `preset`: resuming compares them with that field at its default."""
    cfg = tiny_cfg.replace(preset="", epochs=2, warmup_epochs=1)
    list(engine.run(cfg, run_dir=tmp_path))  # the checkpoint of its last epoch
    path = tmp_path / engine.CHECKPOINT
    data = torch.load(path, weights_only=True)
    data["config"] = {k: v for k, v in to_dict(cfg).items() if k != "preset"}
    torch.save(data, path)
    events = list(engine.run(cfg, run_dir=tmp_path, resume=True))
    assert [e.kind for e in events] == ["run_started", "run_finished"], events[-1]
    assert events[0].resumed_from == 2
