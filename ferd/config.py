"""Run configuration: one frozen dataclass, every knob named and documented, TOML/JSON round-trip.

Presets are data (assets/presets/*.toml). A preset or config file is a flat table of fields;
unknown keys and bad values are rejected with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

PRESET_DIR = Path(__file__).resolve().parent.parent / "assets" / "presets"

METHODS = ("ferd", "dfrd", "real-data")
UTAE_MODES = ("uniform-kl", "sampled-target", "untargeted", "marginal-kl")
MASK_RULES = ("per-channel", "batch-max")
GENERATOR_RESETS = ("epoch", "never")
STUDENT_LOSSES = ("rslad", "reference-code")
EVAL_ATTACKS = ("clean", "fgsm", "pgd20", "cw", "aa")
SEED_LIMIT = 2**32

# What each method switches off on top of a preset (METHOD.md §2-6). `ferd` keeps the preset's values.
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "ferd": {},
    "dfrd": {"reweight": False, "w_uni": 0.0, "utae_mode": "untargeted"},
    "real-data": {"reweight": False, "w_uni": 0.0, "utae_mode": "untargeted"},
}


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


@dataclass(frozen=True)
class Config:
    """Everything a run needs. Units: pixels in [0,1]; eps and step sizes in that scale."""

    # --- identity ---
    preset: str = ""
    """Preset the run started from ('' = a config file or the defaults): a name for labels, not a setting."""
    method: str = "ferd"
    """`ferd`, `dfrd` (vanilla data-free baseline) or `real-data` (student trained on the real training split)."""
    dataset: str = "digits"
    """Dataset name: digits, mnist, fashion-mnist, svhn, cifar10, cifar100, tiny-imagenet."""
    data_root: str = ""
    """Folder for torchvision datasets / Tiny-ImageNet ('' = the user data dir)."""
    seed: int = 0
    """Seed for torch, numpy and python RNGs (0 <= seed < 2**32, numpy's range)."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu` or `cuda[:N]`."""
    num_threads: int = 0
    """CPU threads for torch (0 = all cores but one, at least one)."""

    # --- models ---
    teacher_arch: str = "digits-cnn"
    """Teacher architecture (registry name in ferd.models)."""
    teacher_checkpoint: str = ""
    """Teacher weights file; '' = train and cache the embedded teacher (digits only)."""
    teacher_epochs: int = 10
    """Adversarial-training epochs of the embedded teacher (part of its cache key)."""
    student_arch: str = "digits-cnn-small"
    """Student architecture (registry name in ferd.models)."""

    # --- schedule ---
    epochs: int = 30
    """E: epochs (one synthesis + reweighting + distillation round each)."""
    warmup_epochs: int = 2
    """Epochs that only train the generator (no student steps)."""
    batch_size: int = 64
    """B: synthetic batch size and student batch size."""
    generator_steps: int = 20
    """N_G: generator/latent updates per epoch."""
    student_steps: int = 20
    """N_S: student updates per epoch."""
    memory_size: int = 4096
    """Synthetic memory bound (samples); the oldest are dropped first."""
    eval_every: int = 5
    """Evaluate on the real test split every k epochs (and always after the last)."""

    # --- generator (METHOD.md §3) ---
    latent_dim: int = 100
    """Size of the generator's latent z."""
    generator_width: int = 64
    """Channels of the generator's last hidden layer (the first has twice as many); 64 = DCGAN reference."""
    generator_reset: str = "never"
    """`epoch`: re-initialise G each epoch (reference); `never`: keep G and its optimiser, fresh z each epoch."""
    lr_generator: float = 2e-3
    lr_latent: float = 1.5e-2
    w_bn: float = 5.0
    """Weight of the BN-statistics loss."""
    w_oh: float = 1.0
    """Weight of the one-hot (CE on sampled class) loss."""
    w_adv: float = 1.0
    """Weight of the teacher-student disagreement loss."""
    w_uni: float = 5.0
    """Weight of the uniformity loss on non-robust features (0 = plain DFRD samples)."""
    augment: bool = True
    """Random crop (padding 2 for 16px, 4 for 32px+) and flip where the dataset allows it."""

    # --- robust / non-robust feature split (METHOD.md §5) ---
    mask_rule: str = "per-channel"
    """`per-channel`: robust iff sigma^2 > v of that channel; `batch-max`: sigma^2 > max v (released code)."""
    split_steps: int = 50
    split_lr: float = 0.1
    split_beta: float = 0.3

    # --- robustness-guided reweighting (METHOD.md §4) ---
    reweight: bool = True
    """Update class proportions from teacher margins; False keeps them uniform."""
    c_min: float = 0.05
    c_max: float = 0.2
    reweight_steps: int = 20
    """PGD steps on the teacher for the margins."""

    # --- student distillation and UTAE (METHOD.md §6) ---
    eps: float = 0.1
    """L-infinity budget for training and evaluation attacks."""
    step_size: float = 0.025
    """PGD step size for training attacks and PGD-20 / CW evaluation."""
    train_attack_steps: int = 10
    utae_mode: str = "uniform-kl"
    """`uniform-kl`, `sampled-target` (UTAE), `marginal-kl` (UTAE at full strength: spreads the batch's targets, not
    each prediction) or `untargeted` (plain KL PGD, DFRD)."""
    utae_weight: float = 10.0
    """lambda_u for `uniform-kl`."""
    utae_marginal_weight: float = 0.1
    """lambda_m for `marginal-kl`: weight of KL(uniform over the wrong classes || the batch's mean wrong-class
    prediction per true class)."""
    attack_reference_every: int = 5
    """Every k epochs (and at the last), also run an untargeted KL-PGD on the same batches as the training attack,
    the reference its success rate is compared with (METHOD.md §6); 0 = never. It never changes training."""
    student_loss: str = "rslad"
    """`rslad`: w_nat KL(clean) + w_rob KL(adv); `reference-code`: what the released code effectively optimises."""
    w_nat: float = 1 / 6
    w_rob: float = 5 / 6
    lr_student: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4

    # --- evaluation (METHOD.md §7) ---
    eval_attacks: tuple[str, ...] = ("clean", "fgsm", "pgd20", "cw")
    """Attacks at intermediate evaluations."""
    final_attacks: tuple[str, ...] = ("clean", "fgsm", "pgd20", "cw", "aa")
    """Attacks at the final evaluation."""
    eval_steps: int = 20
    cw_kappa: float = 50.0
    aa_subset: int = 0
    """AutoAttack on the first n test samples (stratified); 0 = the whole split."""
    eval_batch_size: int = 256

    # --- dashboard payloads ---
    thumbnails: int = 64
    """Synthetic samples per epoch sent with their teacher features (gallery and embedding)."""

    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Reserved; must stay empty (kept so old files fail loudly, not silently)."""

    def __post_init__(self) -> None:
        validate(self)

    # ---- helpers ----
    def replace(self, **changes: Any) -> "Config":
        return from_dict({**to_dict(self), **changes})

    def for_method(self, method: str) -> "Config":
        """This config with `method` set and the components that method switches off, off."""
        if method not in METHODS:
            raise ConfigError(f"method: unknown {method!r}; choose one of {', '.join(METHODS)}")
        return self.replace(method=method, **METHOD_OVERRIDES[method])


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config) if f.name != "extra")


def field_doc(name: str) -> str:
    """The docstring written under a field (used by the CLI and the dashboard's help texts)."""
    import inspect

    src = inspect.getsource(Config)
    lines = src.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{name}:"):
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if nxt.startswith('"""'):
                return nxt.strip('"')
    return ""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def validate(c: Config) -> None:
    _check(c.method in METHODS, "method", f"unknown {c.method!r}; choose one of {', '.join(METHODS)}")
    _check(c.utae_mode in UTAE_MODES, "utae_mode", f"unknown {c.utae_mode!r}; choose one of {', '.join(UTAE_MODES)}")
    _check(c.mask_rule in MASK_RULES, "mask_rule", f"unknown {c.mask_rule!r}; choose one of {', '.join(MASK_RULES)}")
    _check(c.generator_reset in GENERATOR_RESETS, "generator_reset",
           f"unknown {c.generator_reset!r}; choose one of {', '.join(GENERATOR_RESETS)}")
    _check(c.student_loss in STUDENT_LOSSES, "student_loss",
           f"unknown {c.student_loss!r}; choose one of {', '.join(STUDENT_LOSSES)}")
    for name in ("epochs", "teacher_epochs", "batch_size", "generator_steps", "memory_size", "eval_every", "latent_dim",
                 "split_steps", "eval_steps", "eval_batch_size", "generator_width"):
        _check(isinstance(getattr(c, name), int) and getattr(c, name) >= 1, name, "must be an integer >= 1")
    for name in ("warmup_epochs", "student_steps", "reweight_steps", "train_attack_steps", "aa_subset",
                 "thumbnails", "num_threads", "seed", "attack_reference_every"):
        _check(isinstance(getattr(c, name), int) and getattr(c, name) >= 0, name, "must be an integer >= 0")
    _check(c.seed < SEED_LIMIT, "seed", f"must be below 2**32 = {SEED_LIMIT} (numpy's seed range), got {c.seed}")
    _check(c.warmup_epochs < c.epochs or c.method == "real-data", "warmup_epochs",
           f"must be smaller than epochs ({c.epochs}), or no student is ever trained")
    for name in ("w_bn", "w_oh", "w_adv", "w_uni", "utae_weight", "utae_marginal_weight", "w_nat", "w_rob",
                 "split_beta", "weight_decay", "momentum", "cw_kappa"):
        v = getattr(c, name)
        _check(isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf"), name,
               "must be a finite number >= 0")
    for name in ("lr_generator", "lr_latent", "lr_student", "split_lr"):
        v = getattr(c, name)
        _check(isinstance(v, (int, float)) and 0 < v < 10, name, "must be a number in (0, 10)")
    _check(isinstance(c.eps, (int, float)) and 0 < c.eps <= 1, "eps", "must be in (0, 1] (pixels are in [0,1])")
    _check(isinstance(c.step_size, (int, float)) and 0 < c.step_size <= c.eps, "step_size",
           f"must be in (0, eps={c.eps}]")
    _check(isinstance(c.c_min, (int, float)) and isinstance(c.c_max, (int, float)) and 0 < c.c_min <= c.c_max,
           "c_min", f"need 0 < c_min <= c_max (got c_min={c.c_min}, c_max={c.c_max})")
    for name in ("eval_attacks", "final_attacks"):
        bad = [a for a in getattr(c, name) if a not in EVAL_ATTACKS]
        _check(not bad, name, f"unknown attack(s) {bad}; choose from {', '.join(EVAL_ATTACKS)}")
    _check(not c.extra, "extra", "must be empty")
    if c.device != "auto":
        _check(c.device == "cpu" or c.device.startswith("cuda"), "device", "must be auto, cpu or cuda[:N]")


# ---- serialisation ----
def to_dict(c: Config) -> dict[str, Any]:
    d = {name: getattr(c, name) for name in FIELD_NAMES}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(d: dict[str, Any]) -> Config:
    """Build a Config from a flat mapping; unknown keys and wrongly typed values raise ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a table of fields, got {type(d).__name__}")
    unknown = sorted(set(d) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for k, v in d.items():
        t = types[k]
        if t == "bool":
            if not isinstance(v, bool):
                raise ConfigError(f"{k}: must be true or false, got {v!r}")
        elif t == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                else:
                    raise ConfigError(f"{k}: must be an integer, got {v!r}")
        elif t == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{k}: must be a number, got {v!r}")
            v = float(v)
        elif t == "str":
            if not isinstance(v, str):
                raise ConfigError(f"{k}: must be a string, got {v!r}")
        elif t.startswith("tuple"):
            if isinstance(v, str) or not isinstance(v, (list, tuple)):
                raise ConfigError(f"{k}: must be a list of names, got {v!r}")
            v = tuple(str(x) for x in v)
        kwargs[k] = v
    return Config(**kwargs)


def to_toml(c: Config) -> str:
    return tomli_w.dumps(to_dict(c))


def to_json(c: Config) -> str:
    return json.dumps(to_dict(c), indent=2)


def load(path: str | Path) -> Config:
    """Load a TOML or JSON config file (flat table of fields)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file (byte {e.start} is not UTF-8); expected TOML or JSON") from e
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from e
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: cannot parse: {e}") from e
    if not isinstance(data, dict):
        got = "null" if data is None else type(data).__name__
        raise ConfigError(f"{p}: must hold a table of config fields, got {got}")
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str, **overrides: Any) -> Config:
    """Load assets/presets/<name>.toml (its `preset` field set to `name`), then apply overrides."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return load(path).replace(**{"preset": name, **overrides})
