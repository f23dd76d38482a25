"""The small public Python API: ``model, preprocess, tokenizer = clipforge.load(path)``."""

from __future__ import annotations

from pathlib import Path

import torch

from clipforge.data.transforms import EvalPreprocess
from clipforge.eval.evaluate import evaluate  # noqa: F401  (public: clipforge.evaluate)
from clipforge.eval.zeroshot import zero_shot_classifier  # noqa: F401  (public: clipforge.zero_shot_classifier)
from clipforge.train import checkpoint as ckpt


def load(path: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint directory offline (no recipe file needed).

    Returns ``(model, preprocess, tokenizer)``: the model in eval mode, a PIL -> uint8 tensor
    preprocess, and the tokenizer (``tokenizer(["a red circle"]) -> (input_ids, attention_mask)``).
    ``path`` may be a run's ``checkpoints/latest``, a ``step_*`` directory, or its model.safetensors.
    """
    from clipforge.models.clip import CLIP
    from clipforge.models.tokenizer import load_tokenizer

    path = Path(path)
    if path.is_file():
        path = path.parent
    config = ckpt.read_config(path)
    model = CLIP(ckpt.model_config_from(config))
    ckpt.load_model_weights(model, path)
    model.to(device).eval()
    tokenizer = load_tokenizer(config["tokenizer"], path)
    preprocess = EvalPreprocess(config["preprocess"]["image_size"])
    return model, preprocess, tokenizer
