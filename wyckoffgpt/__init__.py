"""wyckoffgpt: generate inorganic crystal structures with a transformer over Wyckoff tokens."""
from transformers import AutoConfig, AutoModel

from .configuration_wyckoffgpt import WyckoffGPTConfig
from .generation import CrystalGenerator
from .grammar import DecodeError
from .modeling_wyckoffgpt import WyckoffGPTModel
from .symmetry import EncodeError
from .tokenizer import CrystalSequence, CrystalTokenizer

# So that transformers' AutoConfig / AutoModel load our folders (exist_ok: re-import must not fail).
AutoConfig.register("wyckoffgpt", WyckoffGPTConfig, exist_ok=True)
AutoModel.register(WyckoffGPTConfig, WyckoffGPTModel, exist_ok=True)

__all__ = ["CrystalGenerator", "CrystalSequence", "CrystalTokenizer", "DecodeError", "EncodeError",
           "WyckoffGPTConfig", "WyckoffGPTModel"]
