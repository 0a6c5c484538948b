"""Candidate training attacks on one trained student, on the same batches (README "A UTAE at full strength").

For each candidate: the success rate (share of adversarial examples the student, in eval mode, assigns to a class
other than y), its ratio to untargeted KL-PGD's, and the target entropy (mean row entropy of the attack-target
histogram / log(C-1)), on 640 samples of the run's synthetic memory and on the 540 digits test images.
All candidates use the run's eps, step size, step count and start noise, and the same random stream.

    python -m ferd.attack_study RUN_DIR [CANDIDATE,CANDIDATE,...]

RUN_DIR is a finished data-free run's directory (config.toml, checkpoint.pt, student.pt).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ferd.attacks import isolated_rng, pgd
from ferd.config import load
from ferd.data import dataset_info, test_split
from ferd.distillation import START_NOISE, adversarial_predictions, sampled_targets, training_attack
from ferd.engine import load_student
from ferd.metrics import target_counts, target_entropy
from ferd.teachers import load_teacher

CANDIDATES = ("untargeted", "uniform-kl 10", "uniform-kl 1", "uniform-kl 0.3", "uniform-kl 0.1", "sampled-target",
              "sampled-target-margin", "proximal-target-margin 0.5", "proximal-target-margin 1",
              "proximal-target-margin 2", "marginal-kl 0.05", "marginal-kl 0.1", "marginal-kl 0.2", "marginal-kl 0.3",
              "marginal-kl 1", "marginal-kl 3")
"""`<utae_mode> [weight]` runs ferd's own training attack; `sampled-target-margin` maximises the margin
z_t - max_{j != t} z_j towards a uniformly drawn wrong class t; `proximal-target-margin T` draws t from the
student's clean softmax over the wrong classes at temperature T."""


def margin_to(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    zt = logits.gather(1, t[:, None]).squeeze(1)
    return (zt - logits.scatter(1, t[:, None], float("-inf")).amax(dim=1)).mean()


def attack(name: str, cfg, student, x, y, t_logits, c: int) -> torch.Tensor:
    mode, _, weight = name.partition(" ")
    common = dict(eps=cfg.eps, steps=cfg.train_attack_steps, step_size=cfg.step_size, init_noise=START_NOISE)
    if mode == "sampled-target-margin":
        return pgd(student, x, sampled_targets(y, c), loss=margin_to, **common)
    if mode == "proximal-target-margin":
        with torch.no_grad():
            z = student.eval()(x).scatter(1, y[:, None], float("-inf"))
        t = torch.multinomial(F.softmax(z / float(weight), dim=1), 1).squeeze(1)
        return pgd(student, x, t, loss=margin_to, **common)
    field = {"uniform-kl": "utae_weight", "marginal-kl": "utae_marginal_weight"}.get(mode)
    changes = {field: float(weight)} if field else {}
    return training_attack(cfg.replace(utae_mode=mode, **changes), student, x, y, t_logits, c)


def main(run_dir: Path, names: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    cfg = load(run_dir / "config.toml")
    c = dataset_info(cfg.dataset).num_classes
    student = load_student(run_dir / "student.pt")
    teacher, _ = load_teacher(cfg, torch.device("cpu"))
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    idx = torch.randperm(len(ckpt["memory_y"]), generator=torch.Generator().manual_seed(0))[:640]
    sets = {"synthetic memory (640)": (ckpt["memory_x"][idx], ckpt["memory_y"][idx]),
            "real test split": test_split(cfg.dataset, cfg.data_root)}
    for set_name, (x_all, y_all) in sets.items():
        print(f"\n{set_name}\n| attack | success % | of untargeted | target entropy | s |\n|---|---|---|---|---|")
        base = None
        for name in names:
            t0 = time.perf_counter()
            counts = np.zeros((c, c), dtype=np.int64)
            with isolated_rng(0):
                for s in range(0, len(y_all), cfg.batch_size):
                    x, y = x_all[s:s + cfg.batch_size], y_all[s:s + cfg.batch_size]
                    with torch.no_grad():
                        t_logits = teacher(x)
                    pred = adversarial_predictions(student, attack(name, cfg, student, x, y, t_logits, c))
                    counts += target_counts(y.numpy(), pred.numpy(), c)
            rate = counts.sum() / len(y_all)
            base = rate if base is None else base
            print(f"| {name} | {rate:.1%} | {rate / base:.2f} | {target_entropy(counts):.3f} | "
                  f"{time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else CANDIDATES)
