"""Fingerprint index of a model's training crystals: novelty and prototype checks, offline.

One compressed .npz shipped next to the model (`fingerprints.npz`). It holds the training
sequences themselves, since a token sequence is an exact, invertible description of its crystal
(ids int16, plus float32 values of the value tokens only; the other positions are NaN by
definition), sorted by reduced formula so that one formula's entries form one contiguous block.
Per entry it also keeps the material id, the prototype key (descriptions.prototype_key) and whether the
entry is low-e_hull (its stability token). A novelty check compares the sample's canonical form
with the canonical forms of the block of its formula (wyckoffgpt.duplicates: StructureMatcher's
tolerances, applied to the descriptions), read straight from the stored sequences; StructureMatcher
itself runs only where wyckoffgpt.duplicates needs it (crystals of other keys whose reduced cells it
could match, and samples spglib cannot describe).

Only the dataset's train split goes in: validation crystals were never seen in training, so a
sample that reproduces one counts as novel.

    python -m wyckoffgpt.fingerprints --data DATASET_DIR --out MODEL_DIR/fingerprints.npz
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure

from .atomic import atomic_write
from .data import SequenceDataset, load_meta
from .descriptions import description_composition, prototype_key
from .duplicates import DuplicateIndex, canonical_form, description_form
from .grammar import DecodeError, parse
from .tokenizer import CrystalSequence, CrystalTokenizer
from .vocab import Vocab, default_vocab

FORMAT = "wyckoffgpt-fingerprints-v1"
INDEX_FILE = "fingerprints.npz"
SPLIT = "train"


def build_fingerprint_index(dataset_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the index of `dataset_dir`'s train split to `out_path` (atomically) and return the path."""
    meta = load_meta(dataset_dir)
    vocab = default_vocab()
    if meta["vocab_hash"] != vocab.hash:
        raise ValueError(f"dataset {dataset_dir} uses vocabulary {meta['vocab_hash']}, not the packaged {vocab.hash}")
    ds = SequenceDataset(dataset_dir, SPLIT)
    material_ids = meta.get("material_ids", {}).get(SPLIT)
    if material_ids is None or len(material_ids) != len(ds):
        raise ValueError(f"dataset {dataset_dir} meta.json lacks material ids for its {len(ds)} {SPLIT} sequences")

    offsets = np.asarray(ds.offsets)
    all_ids, all_values = np.asarray(ds.ids), np.asarray(ds.values)
    formulas, prototypes, low = [], [], []
    for i in range(len(ds)):
        lo, hi = offsets[i], offsets[i + 1]
        try:
            desc = parse(vocab, all_ids[lo:hi].astype(np.int64), all_values[lo:hi].astype(np.float64))
        except DecodeError as e:
            raise ValueError(f"{SPLIT} sequence {i} ({material_ids[i]}) does not parse: {e}") from None
        formulas.append(description_composition(desc).reduced_formula)
        prototypes.append(prototype_key(desc))
        low.append(desc.stability == "ehull:low")

    order = np.argsort(np.array(formulas), kind="stable")
    lengths = np.diff(offsets)[order]
    ids = np.concatenate([all_ids[offsets[i]:offsets[i + 1]] for i in order]).astype(np.int16)
    values = np.concatenate([all_values[offsets[i]:offsets[i + 1]] for i in order]).astype(np.float32)
    is_value = np.isin(ids, sorted(vocab.value_ids))
    if not np.isfinite(values[is_value]).all() or np.isfinite(values[~is_value]).any():
        raise ValueError(f"dataset {dataset_dir}: values are not finite exactly at the value tokens")

    sorted_formulas = np.array(formulas)[order]
    group_names, group_starts = np.unique(sorted_formulas, return_index=True)
    proto_names, proto_of = np.unique(np.array(prototypes)[order], return_inverse=True)
    index_meta = {"format": FORMAT, "split": SPLIT, "vocab_hash": vocab.hash, "entries": len(order),
                  "source": meta.get("source"), "dataset_seed": meta.get("seed"),
                  "dataset_split": meta.get("split")}  # "random" or "system": what a benchmark may call unseen
    arrays = {
        "ids": ids,
        "values": values[is_value],  # only the value tokens' values: the rest is NaN by definition
        "lengths": lengths.astype(np.uint16),
        "material_ids": np.array(material_ids)[order],
        "formulas": group_names,
        "group_offsets": np.append(group_starts, len(order)).astype(np.int32),
        "prototypes": proto_names,
        "prototype_of": proto_of.astype(np.int32),
        "low_ehull": np.array(low)[order],
        "meta": np.array(json.dumps(index_meta)),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write(buf.getvalue()))
    return out


class FingerprintIndex:
    """The training crystals of one index file; see the module docstring."""

    def __init__(self, arrays: dict[str, np.ndarray], vocab: Vocab | None = None):
        self.meta: dict[str, Any] = json.loads(str(arrays["meta"]))
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"fingerprint index has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.vocab = vocab or default_vocab()
        if self.meta["vocab_hash"] != self.vocab.hash:
            raise ValueError(f"fingerprint index uses vocabulary {self.meta['vocab_hash']}, not {self.vocab.hash}")
        self.tokenizer = CrystalTokenizer(self.vocab)
        self.ids = arrays["ids"]
        self.values = np.full(len(self.ids), np.nan, dtype=np.float32)
        self.values[np.isin(self.ids, sorted(self.vocab.value_ids))] = arrays["values"]
        self.offsets = np.concatenate([[0], np.cumsum(arrays["lengths"], dtype=np.int64)])
        self.material_ids = arrays["material_ids"]
        self.low_ehull = arrays["low_ehull"]
        self.prototype_names = arrays["prototypes"]
        self.prototype_of = arrays["prototype_of"]
        self.group_offsets = arrays["group_offsets"]
        self.formula_names = [str(f) for f in arrays["formulas"]]
        self.groups = {f: k for k, f in enumerate(self.formula_names)}
        low_keys = self.prototype_names[np.unique(self.prototype_of[self.low_ehull])]
        self.low_prototypes = frozenset(str(p) for p in low_keys)
        self._structures: dict[int, Structure] = {}
        self._matcher = None
        self._forms: dict[str, DuplicateIndex] = {}
        self._by_system: dict[frozenset[str], list[int]] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, vocab: Vocab | None = None) -> FingerprintIndex:
        """Load an index file, or the `fingerprints.npz` inside a model folder."""
        path = Path(path)
        if path.is_dir():
            path = path / INDEX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no fingerprint index at {path} "
                                    "(build one with python -m wyckoffgpt.fingerprints)")
        with np.load(path, allow_pickle=False) as npz:
            return cls({k: npz[k] for k in npz.files}, vocab)

    def __len__(self) -> int:
        return len(self.material_ids)

    def entries(self, reduced_formula: str) -> range:
        """Indices of the training entries with this reduced formula (empty if none)."""
        k = self.groups.get(reduced_formula)
        return range(0) if k is None else range(int(self.group_offsets[k]), int(self.group_offsets[k + 1]))

    def sequence(self, i: int) -> CrystalSequence:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return CrystalSequence.from_ids(self.ids[lo:hi], self.values[lo:hi].astype(np.float64), self.vocab)

    def structure(self, i: int) -> Structure:
        # Decoded on demand and kept: a sample set revisits the same few formulas many times.
        if i not in self._structures:
            self._structures[i] = self.tokenizer.decode(self.sequence(i))
        return self._structures[i]

    def prototype(self, i: int) -> str:
        return str(self.prototype_names[self.prototype_of[i]])

    def entries_of_system(self, elements: Sequence[str]) -> list[int]:
        """Indices of the training entries made of exactly these elements (any order)."""
        if self._by_system is None:
            self._by_system = {}
            for k, name in enumerate(self.formula_names):
                key = frozenset(re.findall(r"[A-Z][a-z]?", name))
                self._by_system.setdefault(key, []).extend(range(int(self.group_offsets[k]), int(self.group_offsets[k + 1])))
        return self._by_system.get(frozenset(elements), [])

    def formulas(self) -> list[str]:
        """Reduced formula of every entry, in index order."""
        return [name for name, size in zip(self.formula_names, np.diff(self.group_offsets)) for _ in range(size)]

    def find_match(self, structure: Structure) -> str | None:
        """Material id of a training crystal equal to `structure` (StructureMatcher's default
        tolerances, compared on canonical forms), or None."""
        formula = structure.composition.reduced_formula
        if not len(self.entries(formula)):
            return None
        form = canonical_form(structure, self.vocab, self.tokenizer.symprec)
        if form is None:
            return self.find_match_pairwise(structure)
        match = self._formula_forms(formula).find(structure, form)
        return None if match is None else str(self.material_ids[match])

    def _formula_forms(self, formula: str) -> DuplicateIndex:
        # Built on first use per formula: a sample set revisits the same few formulas many times.
        if formula not in self._forms:
            forms = self._forms[formula] = DuplicateIndex(vocab=self.vocab, symprec=self.tokenizer.symprec)
            for i in self.entries(formula):
                forms.add_form(description_form(self.tokenizer.parse(self.sequence(i))), i, self.structure(i))
        return self._forms[formula]

    def find_match_pairwise(self, structure: Structure) -> str | None:
        """Like `find_match`, by StructureMatcher against every training crystal of the formula."""
        if self._matcher is None:
            from pymatgen.analysis.structure_matcher import StructureMatcher

            self._matcher = StructureMatcher()
        for i in self.entries(structure.composition.reduced_formula):
            if self._matcher.fit(self.structure(i), structure):
                return str(self.material_ids[i])
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the fingerprint index of a dataset's train split.")
    p.add_argument("--data", required=True, help="tokenized dataset folder (data_prep output)")
    p.add_argument("--out", required=True, help="index file to write, e.g. MODEL_DIR/fingerprints.npz")
    args = p.parse_args(argv)
    out = build_fingerprint_index(args.data, args.out)
    index = FingerprintIndex.load(out)
    print(f"wrote {out}: {len(index)} {SPLIT} crystals, {len(index.groups)} formulas, "
          f"{len(index.low_prototypes)} low-e_hull prototypes, {out.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
