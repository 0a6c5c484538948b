"""Every user mistake of issue 11 (items 4-6): exit 2 and one last line naming the problem, no traceback,
and no run row left behind by a config that cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ferd import atomic
from ferd.cli import main
from ferd.store import RunStore

SMOKE = ["--preset", "smoke", "--set", "num_threads=1"]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _files(tmp: Path) -> dict[str, Path]:
    f = {"random": tmp / "random.pt", "truncated": tmp / "truncated.pt", "mismatched": tmp / "mismatched.pt",
         "malicious": tmp / "malicious.pt", "list_json": tmp / "list.json", "null_json": tmp / "null.json",
         "binary_toml": tmp / "binary.toml", "a_file": tmp / "a_file"}
    f["random"].write_bytes(bytes(range(256)) * 16)
    good = {"arch": "digits-cnn-small", "num_classes": 10, "in_channels": 1, "image_size": 16,
            "state_dict": {"w": torch.zeros(3)}}
    torch.save(good, f["mismatched"])
    f["truncated"].write_bytes(f["mismatched"].read_bytes()[:200])
    torch.save({"x": Evil()}, f["malicious"])
    f["list_json"].write_text(json.dumps([1, 2]))
    f["null_json"].write_text("null")
    f["binary_toml"].write_bytes(b"\x80\x81\xfe\xff" * 8)
    f["a_file"].write_text("not a folder")
    return f


UNKNOWN_ID = "20250101-000000-abcdef"
# (case, argv after --store, fragments the last stderr line must hold). {x} = a file from _files.
CASES = [
    ("eval random student.pt", ["eval", "{random}"], ["random.pt", "cannot read"]),
    ("eval truncated student.pt", ["eval", "{truncated}"], ["truncated.pt", "cannot read"]),
    ("eval mismatched student.pt", ["eval", "{mismatched}"], ["mismatched.pt", "does not match architecture"]),
    ("eval malicious student.pt", ["eval", "{malicious}"], ["malicious.pt", "refused"]),
    ("eval --eps -1", ["eval", "--eps", "-1", "{mismatched}"], ["--eps"]),
    ("--config JSON list", ["run", "--config", "{list_json}"], ["list.json", "table of config fields"]),
    ("--config JSON null", ["run", "--config", "{null_json}"], ["null.json", "got null"]),
    ("--config binary file", ["run", "--config", "{binary_toml}"], ["binary.toml", "not a text file"]),
    ("seed overflow", ["run", *SMOKE, "--seed", "99999999999999999999"], ["seed", "2**32"]),
    ("seed = 2**32", ["run", *SMOKE, "--seed", str(2**32)], ["seed", "2**32"]),
    ("bad device", ["run", *SMOKE, "device=cuda:99"], ["device", "cuda:99"]),
    ("bad dataset", ["run", *SMOKE, "dataset=nope"], ["dataset", "nope"]),
    ("bad teacher arch", ["run", *SMOKE, "teacher_arch=nope"], ["teacher_arch", "nope"]),
    ("bad student arch", ["run", *SMOKE, "student_arch=nope"], ["student_arch", "nope"]),
    ("bad teacher checkpoint", ["run", *SMOKE, "teacher_checkpoint={random}"], ["teacher_checkpoint", "random.pt"]),
    ("unknown run id (export)", ["export", UNKNOWN_ID], [UNKNOWN_ID, "no run"]),
    ("unknown run id (resume)", ["run", "--resume", UNKNOWN_ID], [UNKNOWN_ID, "no run"]),
    ("export --out under a file", ["export", "{run}", "--out", "{a_file}/sub"], ["a_file", "cannot write the export"]),
]


@pytest.mark.parametrize(("case", "argv", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_user_error_exits_2_with_one_line(case, argv, fragments, tmp_path, capsys):
    files = {k: str(v) for k, v in _files(tmp_path).items()}
    store_dir = tmp_path / "store"
    with RunStore(store_dir) as store:  # one finished run to export
        files["run"] = store.create_run(load_preset_smoke(), status="finished")
    capsys.readouterr()
    args = [a.format(**files) for a in argv]
    assert main(["-q", "--store", str(store_dir), *args]) == 2, case
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "\n" not in last
    for fragment in fragments:
        assert fragment.format(**files) in last, (case, last)
    assert "weights_only" not in last  # never torch's advice to unpickle
    assert not Path("pwned").exists()
    with RunStore(store_dir) as store:  # no run row for a config that cannot run
        assert [r.run_id for r in store.list_runs()] == [files["run"]]


def load_preset_smoke():
    from ferd.config import load_preset

    return load_preset("smoke")


def test_invalid_ferd_home_is_one_line(tmp_path, capsys, monkeypatch):
    home = tmp_path / "file"
    home.write_text("x")
    monkeypatch.setenv("FERD_HOME", str(home))
    assert main(["runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and str(home) in err and "not a folder" in err
    monkeypatch.setenv("FERD_HOME", str(home / "sub"))
    assert main(["runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot create the run store folder" in err


def test_read_only_store_reads_and_refuses_writes(tmp_path, capsys, monkeypatch):
    root = tmp_path / "store"
    with RunStore(root) as store:
        run_id = store.create_run(load_preset_smoke(), status="finished")
    real_access = os.access
    # root may write anywhere: stand in for read-only media the way os.access reports them.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK and str(p).startswith(str(root))
                        else real_access(p, mode, **kw))
    assert main(["--store", str(root), "runs"]) == 0
    assert run_id in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["--store", str(root), "export", run_id, "--out", str(out)]) == 0
    assert (out / f"{run_id}.zip").is_file()
    capsys.readouterr()
    assert main(["-q", "--store", str(root), "run", *SMOKE]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "read-only" in err and str(root) in err


def test_runs_into_a_closed_pipe_is_quiet(tmp_path):
    root = tmp_path / "store"
    with RunStore(root) as store:
        for _ in range(3):
            store.create_run(load_preset_smoke(), status="finished")
    env = {**os.environ, "PYTHONUNBUFFERED": "0"}
    proc = subprocess.run(f"{sys.executable} -m ferd --store {root} runs | head -1", shell=True, env=env,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0
    assert len(proc.stdout.splitlines()) == 1
    assert proc.stderr == ""


@pytest.mark.slow
def test_full_disk_fails_the_run_and_keeps_the_last_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    """ENOSPC injected into the checkpoint write of epoch 2: the reason says so; epoch 1's checkpoint is intact."""
    import contextlib
    import errno

    from ferd.runner import execute

    real = atomic.atomic_file
    writes = {"n": 0}

    @contextlib.contextmanager
    def full_on_second_checkpoint(path):
        with real(path) as f:
            if Path(path).name == "checkpoint.pt":
                writes["n"] += 1
                if writes["n"] == 2:
                    f.write(b"partial")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            yield f

    monkeypatch.setattr(atomic, "atomic_file", full_on_second_checkpoint)
    with RunStore(tmp_path / "store") as store:
        run_id = execute(tiny_cfg.replace(epochs=3), store)
        info = store.get_run(run_id)
        failed = [e for _, e in store.events(run_id) if e.kind == "run_failed"]
        assert info.status == "failed"
        assert "no space left on device" in failed[-1].reason
        ckpt = torch.load(store.run_dir(run_id) / "checkpoint.pt", weights_only=True)
        assert ckpt["epoch"] == 1


def test_a_usage_error_answers_without_importing_torch(tmp_path: Path) -> None:
    """The CLI imports torch only for commands that compute: a bad preset or option is reported at once."""
    code = ("import sys; from ferd import cli; rc = cli.main(['run', '--preset', 'nope']); "
            "print(rc, 'torch' in sys.modules)")
    env = dict(os.environ, FERD_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["2", "False"]
    assert "unknown preset 'nope'" in out.stderr


def test_errors_of_the_compute_modules_stay_user_errors_once_imported() -> None:
    from ferd.cli import user_errors
    from ferd.data import DataError
    from ferd.teachers import TeacherError
    from ferd.weights import WeightsError

    assert {DataError, TeacherError, WeightsError} <= set(user_errors())
