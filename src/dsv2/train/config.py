"""The training recipe as data: one TOML file (sections [model] [data] [train] [optim] [moe]) plus
`--section.key=value` overrides, validated into frozen dataclasses. Every unknown key is an error."""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv2.config import ModelConfig
from dsv2.kernels.onednn import CHOICES as GEMM_CHOICES
from dsv2.train.losses import BalanceCoefficients
from dsv2.train.optim import OptimConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] = ()
    tokenizer: str = "deepseek-v2"  # a name Tokenizer.from_name knows, or a directory with tokenizer.json
    seq_len: int = 256
    text_field: str = "text"
    cache_dir: str | None = None  # tokenized data; default <out_dir>/data

    def __post_init__(self) -> None:
        # One string is one path: tuple("corpus.txt") would be its characters, and Path("/") then walks the disk.
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", paths)
        _check(self.seq_len > 0, "data.seq_len", f"must be positive, got {self.seq_len}")


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/default"
    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step, all data-parallel ranks together
    micro_batch_size: int = 8  # sequences per forward on one rank; the rest is gradient accumulation
    batch_ramp_start: int | None = None  # sequences per step at the start of a batch-size ramp
    batch_ramp_tokens: int = 0
    seed: int = 0
    autocast: str = "none"  # or "bfloat16"
    gemm: str = "auto"  # fp32 products: "onednn" (dsv2.kernels.onednn), "torch" (F.linear), "auto" = oneDNN on x86 CPUs
    activation_checkpointing: bool = False
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    progress: bool = True
    # "cpu" or "cuda" (under torchrun each rank takes cuda:LOCAL_RANK, and the process group is nccl)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, name) > 0, f"train.{name}", f"must be positive, got {getattr(self, name)}")
        _check(self.batch_size % self.micro_batch_size == 0, "train.batch_size",
               f"{self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}")
        _check(self.autocast in ("none", "bfloat16"), "train.autocast", f"'none' or 'bfloat16', got {self.autocast!r}")
        _check(self.gemm in GEMM_CHOICES, "train.gemm", f"one of {GEMM_CHOICES}, got {self.gemm!r}")
        _check(self.device in ("cpu", "cuda"), "train.device", f"'cpu' or 'cuda', got {self.device!r}")
        ramp = self.batch_ramp_start
        _check(ramp is None or 0 < ramp <= self.batch_size, "train.batch_ramp_start",
               f"must be in [1, batch_size={self.batch_size}], got {ramp}")
        _check(ramp is None or self.batch_ramp_tokens > 0, "train.batch_ramp_tokens", "a ramp needs ramp tokens > 0")


@dataclass(frozen=True)
class MoETrainConfig:
    expert_balance: float = 0.0  # α1
    device_balance: float = 0.0  # α2
    communication_balance: float = 0.0  # α3
    n_devices: int | None = None  # D; default: the EP size if > 1, else the model's n_group
    max_devices: int | None = None  # M; default: topk_group for group-limited routing, else min(K, D)
    device_limited: bool = False  # route with group_limited_greedy over the D devices, M kept
    capacity_factor: float = 0.0  # device-level token dropping; 0 disables it
    protected_fraction: float = 0.1  # sequences never dropped
    expert_parallel: int = 1  # EP degree under torchrun

    def __post_init__(self) -> None:
        BalanceCoefficients(self.expert_balance, self.device_balance, self.communication_balance)
        _check(self.capacity_factor >= 0, "moe.capacity_factor", f"must be >= 0, got {self.capacity_factor}")
        _check(0 <= self.protected_fraction <= 1, "moe.protected_fraction",
               f"must be in [0, 1], got {self.protected_fraction}")
        _check(self.expert_parallel > 0, "moe.expert_parallel", f"must be positive, got {self.expert_parallel}")
        for name in ("n_devices", "max_devices"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"moe.{name}", f"must be null or positive, got {value}")

    @property
    def coefficients(self) -> BalanceCoefficients:
        return BalanceCoefficients(self.expert_balance, self.device_balance, self.communication_balance)


@dataclass(frozen=True)
class TrainConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    train: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    moe: MoETrainConfig = field(default_factory=MoETrainConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        unknown = set(raw) - {"model", *_SECTIONS}
        _check(not unknown, ", ".join(sorted(unknown)), "unknown section; expected model, data, train, optim, moe")
        for name, value in raw.items():
            _check(isinstance(value, dict), name, "must be a table")
        sections = {name: _build(name, kind, raw.get(name, {})) for name, kind in _SECTIONS.items()}
        return cls(model=dict(raw.get("model", {"preset": "tiny"})), **sections)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"training config {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from e
        for item in overrides:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return _plain(out)

    def model_config(self) -> ModelConfig:
        """[model]: `preset = NAME` or `config = PATH` (a config.json or a checkpoint dir), then field overrides."""
        fields = dict(self.model)
        preset, path = fields.pop("preset", None), fields.pop("config", None)
        fields.pop("init_from", None)
        _check((preset is None) != (path is None), "model", "give exactly one of `preset` or `config`")
        base = ModelConfig.preset(preset) if preset is not None else ModelConfig.from_hf(path)
        known = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
        unknown = set(fields) - known
        _check(not unknown, "model", f"unknown ModelConfig fields {sorted(unknown)}")
        return base.replace(**fields)

    @property
    def init_from(self) -> str | None:
        """[model] init_from: an HF checkpoint directory whose weights start the run (else N(0, init_std))."""
        return self.model.get("init_from")


_SECTIONS: dict[str, type] = {"data": DataConfig, "train": RunConfig, "optim": OptimConfig, "moe": MoETrainConfig}


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`section.key=value` (the leading dashes already stripped); the value is read as TOML, else as a string."""
    key, sep, text = item.partition("=")
    section, dot, name = key.partition(".")
    _check(bool(sep and dot and name), item, "overrides look like --section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    raw.setdefault(section, {})[name] = value


def _build(section: str, cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    _check(not unknown, f"{section}.{', '.join(sorted(unknown))}", f"unknown key; expected one of {sorted(names)}")
    # Field types are strings under `from __future__ import annotations`; get_type_hints evaluates them.
    hints = typing.get_type_hints(cls)
    typed = {name: _typed(f"{section}.{name}", hints[name], value) for name, value in values.items()}
    try:
        return cls(**typed)
    except TypeError as e:
        raise ValueError(f"config section [{section}]: {e}") from e


def _typed(name: str, hint: Any, value: Any) -> Any:  # noqa: ANN401 (any recipe value)
    """`value` checked against a section field's declared type (as TOML gives it: lists for tuples, ints for
    floats) and converted to it, so that the dataclasses' own checks compare numbers with numbers."""
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    # bool is an int subclass in Python, but `steps = true` is a mistake, not 1.
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)  # `lr = 1` is 1.0; nan and inf are never meant
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        if value is None:
            return None
        [inner] = [a for a in args if a is not type(None)]
        return _typed(name, inner, value)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if args[0] is str and isinstance(value, str):
            return (value,)  # one path is a list of one, never its characters
        if isinstance(value, (list, tuple)):
            return tuple(_typed(f"{name}[{i}]", args[0], item) for i, item in enumerate(value))
    raise ValueError(f"config field {name!r}: expected {_describe(hint)}, got {_show(value)}")


def _describe(hint: Any) -> str:  # noqa: ANN401 (a type hint)
    simple = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint in simple:
        return simple[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:  # (`X | None` is described by _typed as its X: TOML has no null)
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural.get(args[0], args[0])}" + (" (or one string)" if args[0] is str else "")
    return str(hint)


def _show(value: Any) -> str:  # noqa: ANN401
    """A value as the recipe spells it: true/false, quoted strings, lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing"
    return repr(list(value) if isinstance(value, tuple) else value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise ValueError(f"config field {name!r}: {reason}")
