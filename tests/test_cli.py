"""The CLI on tiny configs: compare / ablate write results.json with the documented structure."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

import ferd
from ferd import data
from ferd.cli import main, parse_overrides
from ferd.config import ConfigError

TINY = ["--preset", "smoke", "--set", "epochs=2", "num_threads=1"]
ATTACK_KEYS = {"per_class", "counts", "totals", "mean", "worst", "nsd"}


def test_overrides_are_toml_literals():
    assert parse_overrides(["w_uni=2", "reweight=false", "mask_rule=batch-max", 'eval_attacks=["clean"]']) == {
        "w_uni": 2, "reweight": False, "mask_rule": "batch-max", "eval_attacks": ["clean"]}
    with pytest.raises(ConfigError):
        parse_overrides(["w_uni"])


def test_repeated_set_flags_all_apply():
    """`--set a=1 --set b=2` overrides both fields (argparse's default would keep only the last flag's pairs)."""
    from ferd.cli import build_config, make_parser

    argv = ["run", "--preset", "smoke", "--set", "epochs=3", "w_uni=2", "--set", "eval_every=7", "--set", "epochs=4"]
    args = make_parser().parse_args(argv)
    cfg = build_config(args)
    assert (cfg.epochs, cfg.w_uni, cfg.eval_every) == (4, 2.0, 7)


def test_bad_input_is_a_clear_error_not_a_traceback(capsys, tmp_path):
    assert main(["--store", str(tmp_path), "run", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["--store", str(tmp_path), "run", "--set", "c_min=0.5", "c_max=0.1"]) == 2
    assert "c_min" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_writes_results_with_every_method_and_attack(tmp_path, capsys):
    out = tmp_path / "out"
    every_attack = 'final_attacks=["clean","fgsm","pgd20","cw","aa"]'
    rc = main(["-q", "--store", str(tmp_path / "store"), "compare", *TINY, every_attack, "aa_subset=20",
               "--seeds", "0", "--methods", "ferd", "dfrd", "real-data", "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["ferd", "dfrd", "real-data"]
    for r in runs:
        assert r["seed"] == 0 and r["wall_s"] > 0 and r["eps"] == pytest.approx(0.1)
        assert set(r["eval"]) == {"clean", "fgsm", "pgd20", "cw", "aa"}
        for m in r["eval"].values():
            assert ATTACK_KEYS <= set(m)
            assert all(0.0 <= a <= 1.0 for a in m["per_class"])
            assert m["worst"] == pytest.approx(min(m["per_class"]))
        assert sum(r["eval"]["aa"]["totals"]) == 20  # the stated AutoAttack subset
        same = r["eval"]["aa"]["pgd20_same_images_metrics"]  # PGD-20 on exactly AutoAttack's images
        assert same["totals"] == r["eval"]["aa"]["totals"] and same["mean"] == r["eval"]["aa"]["pgd20_same_images"]
        attack = r["training_attack"]
        assert 0.0 <= attack["success_rate"] <= 1.0 and attack["reference_epochs"] == [attack["epochs"][-1]]
        assert sum(r["eval"]["clean"]["totals"]) == 540
        # The student file loads and reproduces the stored clean accuracy on exactly the evaluated tensors.
        model = ferd.load_student(r["student"])
        x, y = data.test_split("digits")
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float()
        per_class = [float(acc[y == c].mean()) for c in range(10)]
        assert per_class == pytest.approx(r["eval"]["clean"]["per_class"])
    ferd_run, dfrd_run, real = runs
    # Synthesis diagnostics for the data-free runs, with the gap to the real-data ceiling.
    for r in (ferd_run, dfrd_run):
        syn = r["synthesis"]
        assert 0.0 <= syn["teacher_acc"] <= 1.0 and 0.0 <= syn["robust_fraction"] <= 1.0
        assert len(syn["class_acc"]) == 10 and sum(syn["memory_share"]) == pytest.approx(1.0)
        assert syn["ceiling_run"] == real["run_id"]
        assert syn["pgd20_gap_to_ceiling"] == pytest.approx(real["eval"]["pgd20"]["mean"] - r["eval"]["pgd20"]["mean"])
    assert real["synthesis"] == {}
    assert "| pgd20 | ferd" in (out / "table.md").read_text()
    assert "| pgd20@aa | ferd" in (out / "table.md").read_text()
    printed = capsys.readouterr().out
    assert "pgd20@aa" in printed and "training attack (last" in printed
    # `eval` on the saved student reproduces the stored clean per-class accuracy.
    assert main(["eval", ferd_run["student"], "--attacks", "clean", "--out", str(tmp_path / "ev.json")]) == 0
    again = json.loads((tmp_path / "ev.json").read_text())["eval"]["clean"]["per_class"]
    assert again == pytest.approx(ferd_run["eval"]["clean"]["per_class"])


@pytest.mark.slow
def test_ablate_writes_a_table_per_value(tmp_path):
    out = tmp_path / "abl"
    rc = main(["-q", "--store", str(tmp_path / "store"), "ablate", *TINY, "--param", "w_uni", "--values", "0", "2",
               "--seeds", "0", "1", "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted((r["config"]["w_uni"], r["seed"]) for r in runs) == [(0.0, 0), (0.0, 1), (2.0, 0), (2.0, 1)]
    table = pd.read_csv(out / "ablation.csv")
    assert list(table["value"]) == [0.0, 2.0] and list(table["n"]) == [2, 2]
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for col in ("clean_mean", "pgd20_mean", "pgd20_worst", "pgd20_nsd"):
        assert table[col].between(0, 5).all()


def test_ablate_rejects_a_non_numeric_field(tmp_path, capsys):
    rc = main(["--store", str(tmp_path), "ablate", "--param", "mask_rule", "--values", "1", "--out", str(tmp_path)])
    assert rc == 2 and "not a numeric config field" in capsys.readouterr().err


def test_the_library_never_imports_streamlit():
    code = ("import sys, ferd, ferd.cli, ferd.engine, ferd.experiments, ferd.bench, ferd.runner, ferd.store; "
            "sys.exit('streamlit' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_runs_lists_labels_headline_metrics_and_student_paths(tmp_path, capsys):
    from ferd.labels import run_label
    from ferd.store import RunStore
    from tests.fakes import populate_store

    with RunStore(tmp_path) as store:
        ids = populate_store(store, methods=("ferd",), seeds=(4,))
        info = store.get_run(ids[0])
        (info.run_dir / "student.pt").write_bytes(b"")
    assert main(["--store", str(tmp_path), "runs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(ids[0]) and out[0].endswith(run_label(ids[0], info.config))
    assert "seed 4" in out[0] and "ferd" in out[0]
    assert "PGD-20 mean" in out[1] and "PGD-20 worst class" in out[1]
    assert out[1].endswith(f"student: {info.run_dir / 'student.pt'}")


def test_every_option_of_eval_has_a_description():
    from ferd.cli import make_parser

    sub = next(a for a in make_parser()._actions if a.dest == "command")
    actions = [a for a in sub.choices["eval"]._actions if a.dest != "help"]
    assert actions and all(a.help for a in actions), [a.dest for a in actions if not a.help]
