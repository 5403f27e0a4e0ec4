"""wyckoffgpt: generate inorganic crystal structures with a transformer over Wyckoff tokens."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from transformers import AutoConfig, AutoModel

from .configuration_wyckoffgpt import WyckoffGPTConfig
from .grammar import DecodeError
from .modeling_wyckoffgpt import WyckoffGPTModel

# So that transformers' AutoConfig / AutoModel load our folders (exist_ok: re-import must not fail).
AutoConfig.register("wyckoffgpt", WyckoffGPTConfig, exist_ok=True)
AutoModel.register(WyckoffGPTConfig, WyckoffGPTModel, exist_ok=True)

# The structure side (pymatgen, spglib) is imported on first use: training and `import wyckoffgpt`
# for the Auto classes need only torch and transformers (importing pymatgen costs ~1.5 s per process).
_LAZY = {
    "CrystalGenerator": ".generation",
    "CrystalSequence": ".tokenizer",
    "CrystalTokenizer": ".tokenizer",
    "EncodeError": ".symmetry",
    "SamplingConfig": ".sampling",
}

if TYPE_CHECKING:
    from .generation import CrystalGenerator
    from .sampling import SamplingConfig
    from .symmetry import EncodeError
    from .tokenizer import CrystalSequence, CrystalTokenizer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CrystalGenerator", "CrystalSequence", "CrystalTokenizer", "DecodeError", "EncodeError",
           "SamplingConfig", "WyckoffGPTConfig", "WyckoffGPTModel"]
