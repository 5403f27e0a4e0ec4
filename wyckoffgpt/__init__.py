"""wyckoffgpt: generate inorganic crystal structures with a transformer over Wyckoff tokens."""
from .grammar import DecodeError
from .symmetry import EncodeError
from .tokenizer import CrystalSequence, CrystalTokenizer

__all__ = ["CrystalSequence", "CrystalTokenizer", "DecodeError", "EncodeError"]

# Model classes, registered with the transformers Auto classes (exist_ok: re-import must not fail).
from transformers import AutoConfig, AutoModel

from .configuration_wyckoffgpt import WyckoffGPTConfig
from .modeling_wyckoffgpt import WyckoffGPTModel

AutoConfig.register("wyckoffgpt", WyckoffGPTConfig, exist_ok=True)
AutoModel.register(WyckoffGPTConfig, WyckoffGPTModel, exist_ok=True)
__all__ += ["WyckoffGPTConfig", "WyckoffGPTModel"]

from .generation import CrystalGenerator  # noqa: E402  (after the model classes it loads)
__all__ += ["CrystalGenerator"]
