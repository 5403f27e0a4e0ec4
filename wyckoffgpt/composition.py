"""The running composition of a sequence: atoms placed so far per declared element, as model inputs.

A sequence never states its stoichiometry: the composition is the sum, over the sites so far, of
each site's multiplicity (which depends on the space group) credited to its element. A small model
has to rebuild that sum by attention at every step, and the default model, trained without help,
lost count in long sequences (its 13+-site samples passed SMACT half as often as the data's). So
after each token the model is also given, per declared element slot (the k elements of the prefix,
in order), the fraction and the log count of atoms placed so far, plus the log total and the number
of sites. These are a deterministic function of the tokens, computed the same way from a whole
sequence (training, `sequence_features`) and from a parser's state (sampling, `parser_features`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from .grammar import SequenceParser
from .vocab import Vocab

# Scales that keep the features of real crystals (up to ~200 atoms and 20 sites per cell) near [0, 1].
_LOG_COUNT_SCALE = math.log(256.0)
_SITE_SCALE = 20.0


def feature_size(slots: int, charge: bool = False) -> int:
    """Width of the feature vector for `slots` element slots: fractions, log counts, log total, sites,
    and with `charge` whether the atoms placed so far are charge-balanced."""
    return 2 * slots + 2 + int(charge)


@functools.cache
def _charge_balanced(placed: tuple[tuple[str, int], ...]) -> bool:
    """SMACT validity of the placed atoms ((symbol, count), ...)."""
    from .chemistry import smact_valid  # pymatgen and smact: only for models that read this feature

    return smact_valid("".join(f"{el}{c}" for el, c in placed))  # it reduces the formula itself


def _row(counts: list[int], n_sites: int, slots: int, symbols: list[str] | None = None) -> np.ndarray:
    out = np.zeros(feature_size(slots, symbols is not None), dtype=np.float32)
    total = sum(counts)
    for s, c in enumerate(counts[:slots]):
        out[s] = c / total if total else 0.0
        out[slots + s] = math.log1p(c) / _LOG_COUNT_SCALE
    out[2 * slots] = math.log1p(total) / _LOG_COUNT_SCALE
    out[2 * slots + 1] = n_sites / _SITE_SCALE
    if symbols is not None:
        out[2 * slots + 2] = float(_charge_balanced(tuple((el, c) for el, c in zip(symbols, counts) if c)))
    return out


class _Tables:
    def __init__(self, vocab: Vocab) -> None:
        self.element_ids = frozenset(vocab.element_ids.values())
        self.sg_number = {i: n for n, i in vocab.sg_ids.items()}
        self.orbit_ids = frozenset(vocab.orbit_ids.values())
        self.multiplicity: dict[tuple[int, int], int] = {}
        for n in vocab.sg_ids:
            for p in vocab.group(n).positions:
                self.multiplicity[(n, vocab.token_to_id[p.orbit])] = p.multiplicity


@functools.cache
def _tables(vocab: Vocab) -> _Tables:
    return _Tables(vocab)


def sequence_features(vocab: Vocab, ids, slots: int, charge: bool = False) -> np.ndarray:
    """(len(ids), feature_size(slots, charge)) float32: row t describes the composition after token t.
    Padding and tokens before the first site give zeros."""
    tables = _tables(vocab)
    out = np.zeros((len(ids), feature_size(slots, charge)), dtype=np.float32)
    declared: list[int] = []
    symbols: list[str] | None = [] if charge else None
    counts: list[int] = []
    group, pending, n_sites = None, 0, 0
    for t, tok in enumerate(np.asarray(ids).tolist()):
        if tok in tables.element_ids:
            if group is None:
                declared.append(tok)
                counts.append(0)
                if symbols is not None:
                    symbols.append(vocab.z_symbol[vocab.element_z[tok]])
            elif pending:
                counts[declared.index(tok)] += pending
                n_sites += 1
        elif group is None and tok in tables.sg_number:
            group = tables.sg_number[tok]
        pending = tables.multiplicity.get((group, tok), 0) if tok in tables.orbit_ids else 0
        if n_sites:
            out[t] = _row(counts, n_sites, slots, symbols)
    return out


def feature_function(vocab: Vocab, slots: int, charge: bool = False) -> Callable[[np.ndarray], np.ndarray] | None:
    """ids -> features, for `data.collate`; None when the model reads no composition (slots == 0)."""
    return functools.partial(sequence_features, vocab, slots=slots, charge=charge) if slots else None


def parser_features(parser: SequenceParser, slots: int, charge: bool = False) -> np.ndarray:
    """The row of `sequence_features` for the last token the parser was fed."""
    placed = [s for s in parser.sites if s.element]
    if not placed:
        return np.zeros(feature_size(slots, charge), dtype=np.float32)
    counts = [sum(s.position.multiplicity for s in placed if s.element == e) for e in parser.elements]
    return _row(counts, len(placed), slots, list(parser.elements) if charge else None)
