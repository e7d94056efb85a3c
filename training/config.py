"""Training configuration: typed sections, YAML profiles, dotted ``key=value`` overrides.

A configuration is a :class:`Config` of typed sections (``model``, ``mask``, ``loss``, ``data``,
``optim``, ``schedule``, ``train``). Its defaults are the paper recipe for SAR-W-SimMIM
(docs/design.md); a profile in ``training/configs/`` (``simmim_paper``, ``simmim_tiny``,
``mixmae_paper``, ``mixmae_tiny``) or any YAML file overrides some of them, and command-line
arguments ``section.key=value`` override the result::

    cfg = load_config("simmim_tiny", ["optim.base_lr=1e-3", "model.window_size=8",
                                      "optim.betas=[0.9,0.95]", "train.max_steps=null"])

Values are parsed with ``yaml.safe_load`` and checked against the field's type: ``1e-3``
(which YAML reads as a string) is accepted for a float, an int for a float, ``null`` only where
the field allows ``None``; a list for a list field. An unknown section or key, or a value of the
wrong type, raises :class:`ConfigError` naming the key, what was given and what is expected
(with close matches for misspelt keys).

Learning rate: the optimiser's peak lr is ``optim.base_lr × global batch / optim.lr_batch_base``
with ``global batch = data.batch_size × world size × optim.accum_steps`` (MAE/MixMAE rule,
1.5e-4 × 2048/256 = 1.2e-3 for the papers' 8 × 256).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "CONFIG_DIR",
    "RESUME_MAY_CHANGE",
    "RESUME_MAY_OVERRIDE",
    "Config",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "SegConfig",
    "TrainConfig",
    "apply_overrides",
    "config_diff",
    "config_from_dict",
    "load_config",
    "profile_names",
    "resolve_profile",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


# ---------------------------------------------------------------------------------------------
# Schema


@dataclass
class ModelConfig:
    """The pretraining model: a Swin-B or tiny Swin encoder inside SimMIM or MixMAE."""

    size: Literal["base", "tiny"] = "base"  # swin_base / swin_tiny (mixmae_base / mixmae_tiny)
    img_size: int = 256
    window_size: int = 8
    drop_path_rate: float = 0.0
    decoder_dim: int | None = None  # MixMAE decoder; None: the builder's (512 base, 64 tiny)
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    grad_checkpointing: bool = False


@dataclass
class MaskConfig:
    """Mask ratio and mask unit (pixels): SimMIM 0.6 over 16 px, MixMAE 0.5 over 32 px."""

    ratio: float = 0.6
    unit: int = 16


@dataclass
class LossConfig:
    kind: Literal["l1", "mse", "huber"] = "l1"  # SimMIM pixel error (MixMAE: always MSE)
    huber_delta: float = 1.0
    sar_weight: bool = True  # SAR-W-*: weight the pixel error by the SAR intensity weight
    weight_source: Literal["batch", "model"] = "batch"  # loader's weight, or recomputed here
    weight_domain: Literal["db", "normalized"] = "db"
    weight_k: float = 1.0
    norm_pix: bool = True  # MixMAE per-patch normalised targets


@dataclass
class DataConfig:
    split: str = "pretrain"
    batch_size: int = 256  # per rank (per GPU)
    num_workers: int = 8  # DataLoader processes per rank (0: in the training process)
    augment: bool = True
    shuffle_buffer: int = 256
    skip_errors: int = 0  # transient shard read failures a loader worker may skip per epoch
    # bad shards (missing, unreadable, sha256 / size / sample count differing from the manifest)
    # a loader worker may skip per epoch, each logged and counted in the loader stats (0: fail)
    max_bad_shards: int = 0
    retries: int = 3
    timeout: float = 60.0
    # where the z-score, SAR weight map and int64 labels are made: "device" (the training step,
    # on the GPU; loaders ship float16 dB) or "worker" (the loader processes)
    prepare: Literal["device", "worker"] = "device"


@dataclass
class SegConfig:
    """Fine-tuning (``method: finetune``): segmenter, loss and evaluation (docs/design.md §4).

    The three refinements of arXiv 2601.15705 are switches: ``hires_injection`` (i),
    ``refine_up`` (ii), ``alpha_scaled`` (iii: the α-scaled focal + dice loss; off = the same
    focal + dice with α ≡ 1 and α_scale 1, i.e. no class weighting in the focal term).
    """

    task: Literal["lulc", "water"] = "lulc"  # 9-class LULC, or binary water (one logit)
    pretrained: str | None = None  # encoder.pth / pretraining checkpoint; None: random init
    hires_injection: bool = True  # (i) post-patch-embedding map in the fusion
    refine_up: bool = True  # (ii) progressive refine-up head
    alpha_scaled: bool = True  # (iii) α-scaled focal + dice (α from the train split)
    loss: Literal["focal_dice", "ce"] = "focal_dice"  # LULC loss ("ce": plain baseline)
    alpha_scale: float = 2.25
    gamma: float = 1.1
    lambda_focal: float = 0.57
    lambda_dice: float = 0.32
    water_lambda_dice: float = 1.0  # water: BCE + λ · soft dice
    threshold: float = 0.5  # water: sigmoid threshold
    channels: int | None = None  # decoder width; None: 512 (base), 64 (tiny)
    dropout: float = 0.1
    val_split: str | None = "val"  # evaluated every epoch; best checkpoint by its mIoU / IoU
    test_split: str | None = "test"  # evaluated with the best weights at the end
    eval_batch_size: int | None = None  # None: data.batch_size
    panels: int = 4  # SAR | prediction | truth panels in the test report


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # peak lr = base_lr × global batch / lr_batch_base
    lr_batch_base: int = 256
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float | None = 5.0  # max global grad norm; None: no clipping
    accum_steps: int = 1  # micro-batches per optimiser step
    layer_decay: float = 1.0  # fine-tuning: lr × layer_decay^(depth from the top); 1: off


@dataclass
class ScheduleConfig:
    epochs: int = 800
    warmup_epochs: float = 40.0
    min_lr: float = 0.0  # cosine floor (absolute, scaled like the peak for layer-decay groups)


@dataclass
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    compile: bool = False  # torch.compile the model
    channels_last: bool = False  # NHWC memory format (CUDA only)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimiser steps
    log_every: int = 1  # steps between metric lines
    ckpt_every_steps: int = 0  # 0: only at epoch ends
    ckpt_every_epochs: int = 1
    keep_every_epochs: int = 0  # also keep checkpoint-epochNNNN.pt every N epochs (0: never)
    figure: bool = True  # reconstruction PNG at the end
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True
    log_dir: str | None = None  # local metrics/TensorBoard dir; None: out (or a temporary dir)
    rank_summary: bool = True  # ranks/rank-NNNNN.json: steps, samples, parameter checksum


@dataclass
class Config:
    method: Literal["simmim", "mixmae", "finetune"] = "simmim"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seg: SegConfig = field(default_factory=SegConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON and ``torch.load(weights_only=True)`` safe)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> Config:
        """Cross-field checks; returns self."""
        errs = []
        if self.data.batch_size < 1:
            errs.append(f"data.batch_size must be >= 1, got {self.data.batch_size}")
        if self.data.max_bad_shards < 0:
            errs.append(f"data.max_bad_shards must be >= 0, got {self.data.max_bad_shards}")
        if self.optim.accum_steps < 1:
            errs.append(f"optim.accum_steps must be >= 1, got {self.optim.accum_steps}")
        if self.optim.lr_batch_base < 1:
            errs.append(f"optim.lr_batch_base must be >= 1, got {self.optim.lr_batch_base}")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            errs.append(f"optim.betas must be two numbers in [0, 1), got {self.optim.betas}")
        if self.schedule.epochs < 1:
            errs.append(f"schedule.epochs must be >= 1, got {self.schedule.epochs}")
        if not 0 <= self.schedule.warmup_epochs <= self.schedule.epochs:
            errs.append(
                f"schedule.warmup_epochs must be in [0, epochs={self.schedule.epochs}], "
                f"got {self.schedule.warmup_epochs}"
            )
        if not 0.0 <= self.mask.ratio <= 1.0:
            errs.append(f"mask.ratio must be in [0, 1], got {self.mask.ratio}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.train.device)):
            errs.append(
                f"train.device must be auto, cpu, cuda or cuda:N, got {self.train.device!r}"
            )
        if self.train.log_every < 1:
            errs.append(f"train.log_every must be >= 1, got {self.train.log_every}")
        if self.train.max_steps is not None and self.train.max_steps < 1:
            errs.append(f"train.max_steps must be >= 1 or null, got {self.train.max_steps}")
        if self.seed < 0:
            errs.append(f"seed must be >= 0, got {self.seed}")
        if not 0.0 < self.optim.layer_decay <= 1.0:
            errs.append(f"optim.layer_decay must be in (0, 1], got {self.optim.layer_decay}")
        if not 0.0 < self.seg.threshold < 1.0:
            errs.append(f"seg.threshold must be in (0, 1), got {self.seg.threshold}")
        if self.method == "finetune" and self.data.split != "train":
            errs.append(f"fine-tuning trains on data.split=train, got {self.data.split!r}")
        if errs:
            raise ConfigError("invalid configuration: " + "; ".join(errs))
        return self


# ---------------------------------------------------------------------------------------------
# Type checking of values


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and where lossless, converted) to type ``tp``; else ConfigError."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise bad
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad  # pragma: no cover - schema types are covered above


def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_classes() -> dict[str, Any]:
    return {k: v for k, v in _hints(Config).items() if dataclasses.is_dataclass(v)}


def _unknown(key: str, choices: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(choices), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown configuration key {key!r}{hint}; known: {', '.join(choices)}")


def config_from_dict(data: Mapping[str, Any], base: Config | None = None) -> Config:
    """A :class:`Config` from a nested mapping, over ``base`` (default: the defaults).

    Raises:
        ConfigError: unknown keys or wrongly typed values.
    """
    cfg = copy.deepcopy(base) if base is not None else Config()
    if not isinstance(data, Mapping):
        raise ConfigError(f"a configuration must be a mapping, got {type(data).__name__}")
    hints = _hints(Config)
    sections = _section_classes()
    for key, value in data.items():
        if key not in hints:
            raise _unknown(str(key), list(hints))
        if key in sections:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
            sec = getattr(cfg, key)
            sec_hints = _hints(sections[key])
            for k, v in value.items():
                if k not in sec_hints:
                    raise _unknown(f"{key}.{k}", [f"{key}.{n}" for n in sec_hints])
                setattr(sec, k, _coerce(v, sec_hints[k], f"{key}.{k}"))
        else:
            setattr(cfg, key, _coerce(value, hints[key], key))
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.base_lr=1e-3"`` -> ``(["optim", "base_lr"], "1e-3")`` (value via yaml.safe_load)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. optim.base_lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with ``section.key=value`` (or ``key=value`` at top level) applied."""
    out = copy.deepcopy(cfg)
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) > 2:
            raise _unknown(".".join(parts), _all_keys())
        nested: dict[str, Any] = (
            {parts[0]: value} if len(parts) == 1 else {parts[0]: {parts[1]: value}}
        )
        if len(parts) == 1 and parts[0] in _section_classes():
            raise ConfigError(
                f"override {text!r}: {parts[0]!r} is a section; set its keys, e.g. "
                f"{parts[0]}.{next(iter(_hints(_section_classes()[parts[0]])))}=..."
            )
        try:
            out = config_from_dict(nested, out)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None
    return out


def _all_keys() -> list[str]:
    keys = []
    for k, tp in _hints(Config).items():
        if dataclasses.is_dataclass(tp):
            keys += [f"{k}.{n}" for n in _hints(tp)]
        else:
            keys.append(k)
    return keys


# ---------------------------------------------------------------------------------------------
# Profiles and files


def profile_names() -> list[str]:
    """The profiles shipped in ``training/configs`` (file stems)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_profile(name_or_path: str | Path, method: str | None = None) -> Path:
    """The YAML file of a profile name (``simmim_tiny``), a short name completed with the method
    (``tiny`` + ``mixmae`` -> ``mixmae_tiny``; without a method: ``simmim_tiny``) or a path to a
    YAML file."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    name = str(name_or_path)
    candidates = [name, f"{method or 'simmim'}_{name}"]
    for c in candidates:
        f = CONFIG_DIR / f"{c.removesuffix('.yaml')}.yaml"
        if f.is_file():
            return f
    raise ConfigError(
        f"config {name!r}: not a file and not a profile (profiles: {', '.join(profile_names())})"
    )


def load_config(
    config: str | Path | Mapping[str, Any] | Config | None = None,
    overrides: Sequence[str] = (),
    method: str | None = None,
) -> Config:
    """Defaults <- profile or YAML file (or mapping) <- ``method`` <- ``overrides``; validated.

    Args:
        config: profile name, YAML path, a mapping or a :class:`Config`; ``None``: the defaults.
        overrides: ``section.key=value`` strings.
        method: ``simmim`` / ``mixmae``: completes a short profile name (``tiny``) and sets
            ``method``.
    """
    if config is None:
        cfg = Config()
    elif isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif isinstance(config, Mapping):
        cfg = config_from_dict(config)
    else:
        path = resolve_profile(config, method)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        try:
            cfg = config_from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if method is not None:
        cfg = apply_overrides(cfg, [f"method={method}"])
    return apply_overrides(cfg, overrides).validate()


def config_diff(
    a: Config | Mapping[str, Any], b: Config | Mapping[str, Any], ignore: Sequence[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (a value, b value)}`` for the keys that differ, except those under an
    ``ignore`` prefix (``"train"`` ignores the whole section, ``"data.num_workers"`` one key)."""
    da = a.to_dict() if isinstance(a, Config) else dict(a)
    db = b.to_dict() if isinstance(b, Config) else dict(b)

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
        return out

    fa, fb = flat(da), flat(db)
    out = {}
    for k in sorted(set(fa) | set(fb)):
        if any(k == p or k.startswith(p + ".") for p in ignore):
            continue
        if fa.get(k) != fb.get(k):
            out[k] = (fa.get(k), fb.get(k))
    return out


# ---------------------------------------------------------------------------------------------
# Resuming a run: which config keys may differ from the checkpoint's (training.checkpoint uses
# them; they are here, beside the schema, because the CLI needs them without torch)

# Keys that may change between a run and its resume (everything else must match the checkpoint).
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "train",
    "data.num_workers",
    "data.retries",
    "data.timeout",
    "data.skip_errors",
    "data.max_bad_shards",
    "seg.pretrained",
    "seg.test_split",
    "seg.panels",
    "seg.eval_batch_size",
)
# Keys that may change on a resume when named as overrides on its command line (``--resume
# optim.base_lr=1e-5``): the change is applied to the restored optimiser and schedule and
# recorded in ``history.jsonl`` and the checkpoint's ``history``.
RESUME_MAY_OVERRIDE: tuple[str, ...] = ("optim.base_lr", "schedule.epochs")
