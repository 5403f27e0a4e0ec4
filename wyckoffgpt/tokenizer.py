"""CrystalTokenizer: pymatgen Structure <-> CrystalSequence (token ids + one value per token)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from .decode import to_structure
from .grammar import DecodeError, WyckoffDescription, parse
from .symmetry import EncodeError, describe_structure
from .vocab import COORD_TOKENS, LATTICE_TOKENS, Vocab, default_vocab

__all__ = ["CrystalSequence", "CrystalTokenizer", "DecodeError", "EncodeError"]

_VALUE_TOKENS = frozenset(COORD_TOKENS + LATTICE_TOKENS)


@dataclass(eq=False)
class CrystalSequence:
    """Token strings, their ids, and one float per token (NaN where the token is not a value)."""

    tokens: list[str]
    ids: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CrystalSequence) and self.tokens == other.tokens
                and np.array_equal(self.ids, other.ids) and np.array_equal(self.values, other.values, equal_nan=True))

    def __str__(self) -> str:
        """Space-separated tokens; a value token is written `name=value` (shortest exact float)."""
        return " ".join(f"{t}={v!r}" if t in _VALUE_TOKENS else t for t, v in zip(self.tokens, self.values.tolist()))

    @classmethod
    def from_tokens(cls, tokens: list[str], values: list[float], vocab: Vocab | None = None) -> CrystalSequence:
        vocab = vocab or default_vocab()
        unknown = [t for t in tokens if t not in vocab.token_to_id]
        if unknown:
            raise DecodeError(f"unknown token {unknown[0]!r}")
        return cls(list(tokens), np.array([vocab.token_to_id[t] for t in tokens], dtype=np.int64),
                   np.array(values, dtype=np.float64))

    @classmethod
    def from_ids(cls, ids, values, vocab: Vocab | None = None) -> CrystalSequence:
        vocab = vocab or default_vocab()
        ids = np.asarray(ids, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= len(vocab))]
        if len(bad):
            raise DecodeError(f"token id {int(bad[0])} outside the vocabulary (0..{len(vocab) - 1})")
        return cls([vocab.tokens[i] for i in ids.tolist()], ids, np.asarray(values, dtype=np.float64))

    @classmethod
    def from_string(cls, text: str, vocab: Vocab | None = None) -> CrystalSequence:
        tokens, values = [], []
        for word in text.split():
            name, sep, num = word.partition("=")
            if sep and name not in _VALUE_TOKENS:
                raise DecodeError(f"{word!r}: only value tokens carry '=value'")
            if name in _VALUE_TOKENS and not sep:
                raise DecodeError(f"value token {name!r} without '=value'")
            try:
                values.append(float(num) if sep else math.nan)
            except ValueError:
                raise DecodeError(f"{word!r}: {num!r} is not a number") from None
            tokens.append(name)
        return cls.from_tokens(tokens, values, vocab)


# e_above_hull (eV/atom) below which a crystal is `ehull:low`: MP-20 keeps crystals within 0.08 of the
# hull, so its rows are nearly all low, and the MPTS-52 rows above this give the high class.
STABILITY_THRESHOLD = 0.075


class CrystalTokenizer:
    """Encodes ordered crystal structures as canonical Wyckoff token sequences and back.

    `encode(s)` then `decode` gives the same crystal; `encode` of a rotated, translated,
    atom-permuted or supercell copy gives the same tokens (see `symmetry.py` for how).
    """

    def __init__(self, vocab: Vocab | None = None, stability_threshold: float = STABILITY_THRESHOLD,
                 symprec: float = 0.01):
        self.vocab = vocab or default_vocab()
        self.stability_threshold = stability_threshold
        self.symprec = symprec

    def stability_token(self, e_above_hull: float | None) -> str:
        if e_above_hull is None:
            return "ehull:unknown"
        if not math.isfinite(e_above_hull):
            raise EncodeError(f"e_above_hull must be a finite number, or None when unknown (got {e_above_hull})")
        return "ehull:low" if e_above_hull < self.stability_threshold else "ehull:high"

    def encode(self, structure: Structure, e_above_hull: float | None = None) -> CrystalSequence:
        stability = self.stability_token(e_above_hull)
        unknown = sorted({el.symbol for el in structure.composition.elements} - set(self.vocab.element_ids)) \
            if structure.is_ordered else []
        if unknown:
            raise EncodeError(f"element {unknown[0]} is not in the vocabulary")
        table, sites, lattice = describe_structure(structure, self.vocab, self.symprec)
        elements = self.vocab.by_z({s.element for s in sites})
        desc = WyckoffDescription(stability, elements, table, sites, lattice)
        if len(desc.elements) > self.vocab.max_arity:
            raise EncodeError(f"{len(desc.elements)} elements, more than the vocabulary's {self.vocab.max_arity}")
        return self.from_description(desc)

    def from_description(self, desc: WyckoffDescription) -> CrystalSequence:
        tokens = ["<bos>", desc.stability, f"n:{len(desc.elements)}", *desc.elements, f"sg:{desc.group.number}"]
        values = [math.nan] * len(tokens)
        for site in desc.sites:
            tokens += [site.position.orbit, site.element, *site.position.free]
            values += [math.nan, math.nan, *site.free_values]
        for name in desc.group.lattice_free:
            tokens.append(name)
            values.append(desc.lattice[name])
        tokens.append("<eos>")
        values.append(math.nan)
        return CrystalSequence.from_tokens(tokens, values, self.vocab)

    def parse(self, seq: CrystalSequence) -> WyckoffDescription:
        """The Wyckoff description a sequence states (DecodeError if it states none)."""
        return parse(self.vocab, seq.ids, seq.values)

    def decode(self, seq: CrystalSequence) -> Structure:
        """The crystal a sequence describes; DecodeError names the problem if it is invalid."""
        if not isinstance(seq, CrystalSequence):
            raise DecodeError(f"expected a CrystalSequence, got {type(seq).__name__}")
        try:
            return to_structure(self.parse(seq))
        except DecodeError:
            raise
        except (ValueError, ArithmeticError, IndexError, KeyError) as exc:  # numeric edge cases of huge values
            raise DecodeError(f"sequence does not give a valid structure: {exc}") from None

    # -- HuggingFace interop --------------------------------------------------------------
    def hf_tokenizer(self):
        """The discrete vocabulary as a transformers PreTrainedTokenizerFast."""
        return self.vocab.hf_tokenizer()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and the Wyckoff tables into a model folder."""
        self.vocab.save_pretrained(folder)
