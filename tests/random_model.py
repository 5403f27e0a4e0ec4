"""A random-weight tiny WyckoffGPT model saved as a model folder: validity of sampled sequences must
come from the grammar, not from training."""
from __future__ import annotations

from pathlib import Path

import torch


def save_random_model(folder: Path, seed: int = 0) -> Path:
    from wyckoffgpt import CrystalTokenizer, WyckoffGPTConfig, WyckoffGPTModel
    from wyckoffgpt.vocab import default_vocab

    torch.manual_seed(seed)
    vocab = default_vocab()
    model = WyckoffGPTModel(WyckoffGPTConfig.from_preset("tiny", **vocab.model_fields()))
    model.save_pretrained(str(folder))
    CrystalTokenizer(vocab).save_pretrained(folder)
    return folder
