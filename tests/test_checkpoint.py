"""Checkpoint IO: the official layout on disk, sharding, and an error that names each way it can go wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv2 import CheckpointError, Transformer, load, save
from dsv2.checkpoint import layout
from tests.conftest import randomize_, small_config

CFG = small_config()


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    model = randomize_(Transformer(CFG), seed=11)
    save(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_round_trip_is_exact_and_official_names(ckpt: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    assert set(tensors) == {e.hf_name for e in layout(CFG)}
    assert tensors["model.layers.1.mlp.experts.7.up_proj.weight"].shape == (32, 64)  # [out, in]
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (32 + 8, 64)
    assert tensors["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (2 * 32, 64)
    model = load(ckpt, dtype=torch.float32)
    again = Transformer(CFG)
    randomize_(again, seed=11)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharded_save_and_load(tmp_path: Path) -> None:
    model = randomize_(Transformer(CFG), seed=3)
    save(model, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(p.nbytes for p in model.parameters())
    back = load(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, CFG.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), model.eval()(ids))


def test_load_casts_to_the_requested_dtype(ckpt: Path) -> None:
    model = load(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    # without a dtype, config.json's torch_dtype (save wrote float32 for this fp32 model)
    assert {p.dtype for p in load(ckpt).parameters()} == {torch.float32}
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    assert {p.dtype for p in load(ckpt).parameters()} == {torch.bfloat16}
    (ckpt / "config.json").write_text(json.dumps({**config, "torch_dtype": "float99"}))
    with pytest.raises(CheckpointError, match="torch_dtype 'float99' is not a torch dtype"):
        load(ckpt)


def _rewrite(ckpt: Path, edit) -> None:  # noqa: ANN001
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_missing_tensors_are_named(ckpt: Path) -> None:
    _rewrite(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.3.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing tensors.*model\.layers\.2\.mlp\.experts\.3\.down_proj"):
        load(ckpt)


def test_unexpected_tensors_are_named(ckpt: Path) -> None:
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors.*model\.layers\.0\.mlp\.extra\.weight"):
        load(ckpt)


def test_shape_mismatch_names_tensor_and_shapes(ckpt: Path) -> None:
    _rewrite(ckpt, lambda t: t.update({"model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 60)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.o_proj\.weight' has shape \(64, 60\) "
                                              r"but config\.json implies \(64, 64\)"):
        load(ckpt)


def test_weights_that_contradict_the_config(ckpt: Path) -> None:
    """config.json says q_lora_rank is null, the weights carry q_a_proj/q_b_proj."""
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "q_lora_rank": None}))
    with pytest.raises(CheckpointError, match=r"missing tensors.*q_proj.*unexpected.*the weights do not match config"):
        load(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, "n_routed_experts": 4, "num_experts_per_tok": 2}))
    with pytest.raises(CheckpointError, match=r"has shape \(8, 64\) but config\.json implies \(4, 64\)"):
        load(ckpt)


def test_truncated_file(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load(ckpt)


def test_corrupt_header(ckpt: Path) -> None:
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[8:20] = b"\xff" * 12  # garbage inside the JSON header
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(ckpt)


def test_missing_files(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load(ckpt)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    save(randomize_(Transformer(CFG), seed=1), tmp_path, max_shard_size="100KB")
    (tmp_path / "model-00002-of-" f"{len(list(tmp_path.glob('model-*'))):05d}.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard files that do not exist.*model-00002-of"):
        load(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load(tmp_path)


def test_bad_shard_size(tmp_path: Path) -> None:
    model = Transformer(CFG)
    with pytest.raises(ValueError, match="max_shard_size 'big'"):
        save(model, tmp_path, max_shard_size="big")
    with pytest.raises(ValueError, match="must be positive"):
        save(model, tmp_path, max_shard_size=0)


def test_saved_files_get_the_umask_mode(tmp_path: Path) -> None:
    """safetensors writes its shards 0600; every file of a saved checkpoint gets what the umask gives (0644)."""
    import os

    old = os.umask(0o022)
    try:
        save(Transformer(small_config()), tmp_path, max_shard_size="200KB")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {0o644}, modes
