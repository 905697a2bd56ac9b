"""The model dsv2 ships: the final checkpoint of `make tiny-model` (pretraining, SFT, GRPO on this machine's
corpus), inside the package, so `dsv2 serve`, `dsv2 chat`, `dsv2 generate` and `LLM()` work with no --model."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "dsv2-tiny"
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / DEFAULT_MODEL_NAME


def default_model_dir() -> Path:
    """The shipped checkpoint's directory (config.json, model.safetensors, tokenizer files)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the default model is missing from {DEFAULT_MODEL_DIR}; rebuild it with "
                                "`make tiny-model` (then `make ship`) or pass a checkpoint directory")
    return DEFAULT_MODEL_DIR
