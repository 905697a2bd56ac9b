"""Hugging Face safetensors checkpoints <-> dsv2 models: one name table, one loop each way.

The official layout (model-spec §3) keeps every projection and every expert as its own tensor; dsv2
fuses some (q_a_proj + kv_a_proj_with_mqa -> wqkv_a, gate_proj + up_proj -> w13, experts stacked on a
leading axis). Each table row says which slice of which dsv2 parameter one HF tensor fills. This is the
only module that knows Hugging Face parameter names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dsv2 import gguf
from dsv2.config import ModelConfig
from dsv2.hardware import release_freed_memory
from dsv2.kernels import quant
from dsv2.kernels.quant import Scheme
from dsv2.model import Transformer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the config says: the message names the tensor or file."""


# (HF name, dsv2 parameter, part). {i} is the layer, {e} the expert. Part picks rows of a fused matrix:
# "q"/"kv" split wqkv_a, "gate"/"up" split w13; None means the whole tensor.
_GLOBAL = [
    ("model.embed_tokens.weight", "embed.weight", None),
    ("model.norm.weight", "norm.weight", None),
    ("lm_head.weight", "head.weight", None),
]
_LAYER = [
    ("input_layernorm.weight", "attn_norm.weight", None),
    ("post_attention_layernorm.weight", "ffn_norm.weight", None),
    ("self_attn.kv_a_proj_with_mqa.weight", "attn.wqkv_a.weight", "kv"),
    ("self_attn.kv_a_layernorm.weight", "attn.kv_norm.weight", None),
    ("self_attn.kv_b_proj.weight", "attn.wkv_b.weight", None),
    ("self_attn.o_proj.weight", "attn.wo.weight", None),
]
_Q_PLAIN = [("self_attn.q_proj.weight", "attn.wqkv_a.weight", "q")]
_Q_LORA = [
    ("self_attn.q_a_proj.weight", "attn.wqkv_a.weight", "q"),
    ("self_attn.q_a_layernorm.weight", "attn.q_norm.weight", None),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight", None),
]
_DENSE = [
    ("mlp.gate_proj.weight", "ffn.w13.weight", "gate"),
    ("mlp.up_proj.weight", "ffn.w13.weight", "up"),
    ("mlp.down_proj.weight", "ffn.w2.weight", None),
]
_MOE = [
    ("mlp.gate.weight", "ffn.gate.weight", None),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared.w13.weight", "gate"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared.w13.weight", "up"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared.w2.weight", None),
]
_EXPERT = [
    ("mlp.experts.{e}.gate_proj.weight", "ffn.experts.w13", "gate"),
    ("mlp.experts.{e}.up_proj.weight", "ffn.experts.w13", "up"),
    ("mlp.experts.{e}.down_proj.weight", "ffn.experts.w2", None),
]


@dataclass(frozen=True)
class Entry:
    hf_name: str
    param: str  # dsv2 parameter name
    expert: int | None  # index on the stacked expert axis
    part: str | None  # which rows of a fused matrix


def layout(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of the official checkpoint for this config, in the official order."""
    entries = [Entry(hf, p, None, part) for hf, p, part in _GLOBAL]
    for i in range(cfg.num_hidden_layers):
        rows = _LAYER + (_Q_LORA if cfg.q_lora_rank is not None else _Q_PLAIN)
        if cfg.is_moe_layer(i):
            rows = rows + (_MOE if cfg.n_shared_experts else _MOE[:1])
        else:
            rows = rows + _DENSE
        entries += [Entry(f"model.layers.{i}.{hf}", f"layers.{i}.{p}", None, part) for hf, p, part in rows]
        if cfg.is_moe_layer(i):
            entries += [Entry(f"model.layers.{i}.{hf.format(e=e)}", f"layers.{i}.{p}", e, part)
                        for e in range(cfg.n_routed_experts) for hf, p, part in _EXPERT]
    return entries


def _target(param: torch.Tensor, entry: Entry, cfg: ModelConfig) -> torch.Tensor:
    """The view of `param` that `entry`'s HF tensor fills."""
    t = param if entry.expert is None else param[entry.expert]
    rows = t.shape[0]
    if entry.part in ("gate", "up"):
        return t[: rows // 2] if entry.part == "gate" else t[rows // 2 :]
    if entry.part in ("q", "kv"):
        kv = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        return t[: rows - kv] if entry.part == "q" else t[rows - kv :]
    return t


# ---------------------------------------------------------------------------------------------- load
def load(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quantization: str | Scheme | None = None,
) -> Transformer:
    """config.json + model.safetensors (or sharded model-*.safetensors with an index) -> Transformer.

    dtype None means the checkpoint's own `torch_dtype`. The model is built on the meta device; tensors are
    copied in one at a time from memory-mapped files, so peak memory is about one copy of the weights.
    quantization ("int8", "int4" or a dsv2.kernels.quant.Scheme): projections and experts are quantized as they
    stream in -- each parameter is held dense only until its last tensor arrives -- so peak memory is the
    quantized model plus about one layer's experts. A checkpoint written by `dsv2 quantize` (a
    `quantization_config` in config.json) loads quantized, in its own scheme.
    """
    root = Path(path)
    raw = read_config(root)
    cfg = ModelConfig.from_hf(raw)
    stored = _stored_scheme(root, raw)
    scheme = quant.resolve(quantization)
    if stored is not None and scheme is not None and scheme != stored:
        raise CheckpointError(f"{root} holds {stored.method} weights ({stored}); they cannot be requantized to "
                              f"{scheme} -- load the original checkpoint for that")
    scheme = scheme or stored
    with torch.device("meta"):
        model = Transformer(cfg)
    target = dtype or getattr(torch, cfg.torch_dtype, None)
    if not isinstance(target, torch.dtype):
        raise CheckpointError(f"{root}: config.json torch_dtype {cfg.torch_dtype!r} is not a torch dtype; pass dtype=")
    model = model.to(target)
    loader = _Loader(model, cfg, scheme, stored is not None, device)
    for tensor in _tensors(root, target):
        loader.take(tensor)
    loader.finish(root)
    if scheme is not None:
        release_freed_memory()  # the staging's freed pages, so that resident memory is the weights
    model.rotary.inv_freq = model.rotary.inv_freq.to(device)
    return model.eval()


def read_config(path: str | os.PathLike) -> dict:
    """The HF config.json dict of a checkpoint directory, or rebuilt from a GGUF file's metadata."""
    root = Path(path)
    if root.is_file() and gguf.is_gguf(root):
        return gguf.read_config(root)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no config.json (expected a Hugging Face checkpoint directory or a "
                                ".gguf file)")
    try:
        return json.loads((root / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{root}/config.json: not valid JSON ({e})") from e


@dataclass(frozen=True)
class _Tensor:
    name: str  # the official name (with a `_scale` / `_zero` suffix in a quantized checkpoint)
    origin: str  # the file it comes from, for messages
    shape: tuple[int, ...]
    get: Callable[[], torch.Tensor]


def _tensors(root: Path, dtype: torch.dtype) -> Iterator[_Tensor]:
    """Every tensor of a checkpoint, one at a time: from its safetensors memory maps, or dequantized from a GGUF
    (into `dtype`)."""
    if root.is_file():
        for name, t in gguf.iter_tensors(root, dtype=dtype):
            yield _Tensor(name, root.name, tuple(t.shape), lambda t=t: t)
        return
    for file in _weight_files(root):
        with _open(file) as f:
            for name in f.keys():
                yield _Tensor(name, file.name, tuple(f.get_slice(name).get_shape()),
                              lambda f=f, name=name, file=file: _get(f, name, file))


def planned_weight_bytes(path: str | os.PathLike, dtype: torch.dtype | None = None,
                         quantization: str | Scheme | None = None) -> tuple[int, int, str]:
    """(bytes of the loaded weights, bytes at the peak of loading, the format in words) for `load` with these
    arguments, from config.json alone. Quantizing as it loads holds a parameter dense until its last tensor
    arrives: the peak adds the largest such parameter (one layer's expert stack)."""
    root = Path(path)
    raw = read_config(root)
    cfg = ModelConfig.from_hf(raw)
    stored = _stored_scheme(root, raw)
    scheme = quant.resolve(quantization) or stored
    target = dtype or getattr(torch, cfg.torch_dtype, torch.float32)
    with torch.device("meta"):
        model = Transformer(cfg)
    need = quant.weight_bytes(model, scheme, target)
    staging = 0
    if scheme is not None and stored is None:
        source = getattr(torch, cfg.torch_dtype, torch.float32).itemsize
        staging = max(p.numel() * source for name in quant.targets(model, scheme)
                      for p in model.get_submodule(name).parameters(recurse=False))
    what = str(target).removeprefix("torch.") if scheme is None else f"{scheme.method} + {target}".replace("torch.", "")
    return need, need + staging, what


def _stored_scheme(root: Path, raw: dict) -> Scheme | None:
    if "quantization_config" not in raw:
        return None
    try:
        return Scheme.from_config(raw["quantization_config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{root}/config.json: {e}") from e


class _Loader:
    """Streams HF tensors into a meta-built model. Modules that stay dense are materialised up front and filled
    in place; each quantized module's parameters are staged (dense, or in the portable quantized form for a
    quantized checkpoint) until their last tensor arrives, then turned into the quantized module."""

    def __init__(self, model: Transformer, cfg: ModelConfig, scheme: Scheme | None, stored: bool,
                 device: torch.device | str) -> None:
        self.model, self.cfg, self.device, self.stored = model, cfg, device, stored
        self.targets = quant.targets(model, scheme) if scheme is not None else {}
        for name, m in model.named_modules():
            if name not in self.targets and not any(name.startswith(t + ".") for t in self.targets):
                m.to_empty(device=device, recurse=False)
        self.params = dict(model.named_parameters())  # meta for the quantized modules' parameters
        self.table = {e.hf_name: e for e in layout(cfg)}
        # Every tensor the checkpoint must hold: the table's, and for a quantized checkpoint each quantized
        # matrix's scale (and zero) beside it.
        self.expected = list(self.table)
        self.remaining: dict[str, int] = {}  # quantized parameter -> tensors still to come
        for e in self.table.values():
            scheme = self.targets.get(self._module_of(e.param))
            if scheme is None:
                continue
            suffixes = list(quant.part_shapes((1, scheme.group_size), scheme)) if stored else [""]
            self.expected += [e.hf_name + s for s in suffixes if s]
            self.remaining[e.param] = self.remaining.get(e.param, 0) + len(suffixes)
        self.staged: dict[str, dict[str, torch.Tensor]] = {}  # parameter -> part suffix -> staging tensor
        self.done: dict[str, dict[str, quant.QuantizedTensor]] = {}  # module -> parameter -> quantized
        self.filled: set[str] = set()
        self.unexpected: list[str] = []

    @staticmethod
    def _module_of(param: str) -> str:
        return param.rpartition(".")[0]

    def take(self, t: _Tensor) -> None:
        name = t.name
        suffix = next((s for s in quant.PART_SUFFIXES[1:] if name.endswith(s)), "") if self.stored else ""
        base = name[: len(name) - len(suffix)] if suffix else name
        entry = self.table.get(base)
        if entry is None:
            # transformers writes n_shared_experts=0 as zero-width shared-expert tensors
            if 0 not in t.shape:
                self.unexpected.append(name)
            return
        module = self._module_of(entry.param)
        scheme = self.targets.get(module)
        quantized_here = self.stored and scheme is not None
        if suffix and not quantized_here:
            self.unexpected.append(name)
            return
        if quantized_here:
            full = self.params[entry.param].shape
            shape, dtype = quant.part_shapes(full, scheme)[suffix], quant.part_dtypes(scheme)[suffix]
        else:
            shape, dtype = self.params[entry.param].shape, self.params[entry.param].dtype
        if scheme is None:
            dest = self.params[entry.param]
        else:
            parts = self.staged.setdefault(entry.param, {})
            if suffix not in parts:
                parts[suffix] = torch.empty(shape, dtype=dtype, device=self.device)
            dest = parts[suffix]
        view = _target(dest, entry, self.cfg)
        if t.shape != tuple(view.shape):
            raise CheckpointError(
                f"{t.origin}: tensor {name!r} has shape {t.shape} but config.json implies "
                f"{tuple(view.shape)}; the weights contradict the config")
        tensor = t.get()
        if quantized_here and tensor.dtype != dtype:
            raise CheckpointError(f"{t.origin}: tensor {name!r} is {tensor.dtype}, a {scheme.method} checkpoint "
                                  f"stores {dtype} there")
        with torch.no_grad():
            view.copy_(tensor)
        if name in self.filled:
            raise CheckpointError(f"{t.origin}: tensor {name!r} appears twice in the checkpoint")
        self.filled.add(name)
        if scheme is not None:
            self.remaining[entry.param] -= 1
            if self.remaining[entry.param] == 0:
                self._complete(entry.param, module, scheme)

    def _complete(self, param: str, module: str, scheme: Scheme) -> None:
        """A quantized module's parameter has all its rows: quantize it (or take the stored parts); once the
        module's parameters are all in, swap in the quantized module and drop the staging."""
        parts = self.staged.pop(param)
        if self.stored:
            q = quant.QuantizedTensor(parts[""], parts["_scale"], parts.get("_zero"))
        else:
            q = quant.quantize(parts[""], scheme)
        del parts  # a dense staging is freed before the module is built from the quantized parts
        mine = self.done.setdefault(module, {})
        mine[param.rpartition(".")[2]] = q
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        dense = getattr(parent, child)
        if len(mine) == len(list(dense.parameters(recurse=False))):
            setattr(parent, child, quant.build(dense, self.done.pop(module), scheme))

    def finish(self, root: Path) -> None:
        _check_complete(root, self.expected, self.filled, self.unexpected)


def _weight_files(root: Path) -> list[Path]:
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing[:5]}")
        return files
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    raise FileNotFoundError(f"{root}: neither {SINGLE_NAME} nor {INDEX_NAME}")


def _open(file: Path):  # noqa: ANN202 (safetensors' handle type is private)
    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def _get(handle, name: str, file: Path) -> torch.Tensor:  # noqa: ANN001
    try:
        return handle.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from e


def _check_complete(root: Path, expected: list[str], filled: set[str], unexpected: list[str]) -> None:
    missing = [name for name in expected if name not in filled]
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensors (first: {missing[:5]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (first: {sorted(unexpected)[:5]})")
    hint = " -- the weights do not match config.json" if missing and unexpected else ""
    raise CheckpointError(f"{root}: " + "; ".join(parts) + hint)


# ---------------------------------------------------------------------------------------------- save
def save(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write config.json + safetensors shards + index in the official layout (loadable by transformers)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    limit = _parse_size(max_shard_size)
    params = dict(model.named_parameters())
    shards = list(_plan_shards(cfg, params, limit))
    total = sum(_target(params[e.param], e, cfg).nbytes for shard in shards for e in shard)
    weight_map: dict[str, str] = {}
    for n, shard in enumerate(shards, start=1):
        name = SINGLE_NAME if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        # clone: the slices share storage with their fused parameter, which safetensors refuses to write.
        tensors = {e.hf_name: _target(params[e.param], e, cfg).detach().to("cpu").clone() for e in shard}
        save_file(tensors, root / name, metadata={"format": "pt"})
        # safetensors writes through a private temporary file (mode 0600); give the shard the mode any other
        # file this process creates gets, so the checkpoint is readable by whoever may read config.json.
        os.chmod(root / name, 0o666 & ~_umask())
        weight_map.update(dict.fromkeys(tensors, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(params["embed.weight"].dtype).removeprefix("torch.")
    (root / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _plan_shards(cfg: ModelConfig, params: dict[str, torch.Tensor], limit: int) -> Iterator[list[Entry]]:
    shard: list[Entry] = []
    size = 0
    for entry in layout(cfg):
        nbytes = _target(params[entry.param], entry, cfg).nbytes
        if shard and size + nbytes > limit:
            yield shard
            shard, size = [], 0
        shard.append(entry)
        size += nbytes
    if shard:
        yield shard


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?)?B?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB' / '500MB'")
    unit = (m.group(2) or "").upper()
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}[unit]
    return int(float(m.group(1)) * scale)


# ---------------------------------------------------------------------------------------------- quantize
# Files a checkpoint directory carries beside its weights, copied as they are.
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, quantization: str | Scheme | None,
                        max_shard_size: int | str = "2GB", progress: bool = False,
                        dtype: torch.dtype | None = None) -> None:
    """Write `src` (a checkpoint directory or a GGUF file) to `out` in the official layout, with its projections
    and experts quantized (the portable form of dsv2.kernels.quant) unless quantization is None: under the
    official tensor names with `_scale` (and `_zero`) beside each quantized matrix, and the scheme as config.json's
    `quantization_config`; `load(out)` reads it without the original. Tensors stream one at a time, so memory
    stays near one shard. dtype: what unquantized tensors are written as (default: as stored; a GGUF's are
    dequantized to its config's torch_dtype, bfloat16)."""
    root, dest = Path(src), Path(out)
    raw = read_config(root)
    if "quantization_config" in raw:
        raise CheckpointError(f"{root} is already quantized ({raw['quantization_config']}); quantize the original")
    scheme = quant.resolve(quantization)
    cfg = ModelConfig.from_hf(raw)
    with torch.device("meta"):
        model = Transformer(cfg)
    targets = quant.targets(model, scheme) if scheme is not None else {}
    table = {e.hf_name: e for e in layout(cfg)}
    dest.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shard: dict[str, torch.Tensor] = {}
    size = 0
    filled: set[str] = set()
    unexpected: list[str] = []
    written: list[list[str]] = []

    def flush() -> None:
        nonlocal shard, size
        if shard:
            save_file(shard, dest / f"part-{len(written) + 1:05d}.safetensors", metadata={"format": "pt"})
            written.append(list(shard))
        shard, size = {}, 0

    source_dtype = dtype or getattr(torch, cfg.torch_dtype, torch.bfloat16)
    bar = tqdm(total=len(table), unit="tensor", desc="converting" if scheme is None else "quantizing",
               disable=not progress)
    for t in _tensors(root, source_dtype):
        entry = table.get(t.name)
        if entry is None:
            if 0 not in t.shape:
                unexpected.append(t.name)
            continue
        tensor = t.get()
        s = targets.get(entry.param.rpartition(".")[0])
        parts = {"": tensor if dtype is None else tensor.to(dtype)} if s is None else \
            quant.quantize(tensor, s).parts()
        for suffix, part in parts.items():
            if shard and size + part.nbytes > limit:
                flush()
            shard[t.name + suffix] = part.contiguous()
            size += part.nbytes
        filled.add(t.name)
        bar.update()
    flush()
    bar.close()
    _check_complete(root, list(table), filled, unexpected)
    weight_map, total = {}, 0
    for i, names in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(dest / f"part-{i:05d}.safetensors", dest / final)
        os.chmod(dest / final, 0o666 & ~_umask())
        weight_map.update(dict.fromkeys(names, final))
        total += (dest / final).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if scheme is not None:
        raw["quantization_config"] = scheme.to_config()
    if dtype is not None:
        raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dest / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if root.is_file():
        gguf.write_tokenizer(root, dest)
        return
    for side in _SIDE_FILES:
        if (root / side).is_file() and root.resolve() != dest.resolve():
            shutil.copyfile(root / side, dest / side)
