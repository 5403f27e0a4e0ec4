"""Analogue chemical systems: draw a share of a request in systems one element away, substitute back.

Most stable ternary crystals share their structure type with crystals of chemically similar systems
(`benchmarks/prototype_overlap.py` counts how many; BENCHMARKS.md has the figures). A model asked for
a system it has never seen need not propose the structure types it learnt for that system's
neighbours; drawing part of the samples in the neighbours themselves (where the model knows its
structure types) and substituting the elements back puts those types in front of the user. The
substituted crystals keep the neighbour's cell: a relaxation adjusts it.

Nearness is Pettifor's Mendeleev number (`pymatgen.core.Element.mendeleev_no`), the ordering built so
that elements close in it form compounds of the same structure types.

A second source (`SamplingConfig.analogue_source = "known"`) takes the structure types the
neighbours are known to have: the Wyckoff skeletons of the model's training crystals in the analogue
systems, substituted back, each forced on a sample whose coordinates and cell the model draws for
the requested chemistry. With templates (`SamplingConfig.analogue_templates`), the first sample of
each skeleton is the neighbour's crystal itself with the elements put back (the classic substitution
of known prototypes; the model draws the later ones): where the skeleton is right, the neighbour's
coordinates usually are too, and the model's draws miss them more often than not.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import combinations, product
from typing import TYPE_CHECKING

from pymatgen.core import Element

from .grammar import Conditions, DecodeError, Limits, check_conditions
from .symmetry import EncodeError
from .tokenizer import CrystalSequence, CrystalTokenizer
from .vocab import Vocab

if TYPE_CHECKING:
    from .fingerprints import FingerprintIndex

__all__ = ["Analogue", "analogue_conditions", "analogue_slot", "first_round", "known_skeletons", "nearest_elements",
           "substitute", "substituted_systems"]


@dataclass(frozen=True)
class Analogue:
    """A neighbouring system to draw in: its conditions, and the element it has in place of the request's."""

    conditions: Conditions
    replaced: str | None  # the requested system's element (None: a known skeleton, already in it)
    by: str | None  # the element drawn in its place
    # A known skeleton's training crystal of the nearest replacement, with the requested elements put
    # back and the request's stability token (`SamplingConfig.analogue_templates`), and its
    # material id; None for an analogue system.
    template: CrystalSequence | None = None
    template_id: str | None = None

    @property
    def system(self) -> str:
        return "-".join(sorted(self.conditions.elements or ()))


def nearest_elements(element: str, candidates: Sequence[str], k: int) -> list[str]:
    """The k candidates nearest to `element` in Mendeleev number (ties: lower atomic number first)."""
    m = Element(element).mendeleev_no
    others = [c for c in candidates if c != element]
    return sorted(others, key=lambda c: (abs(Element(c).mendeleev_no - m), Element(c).Z))[:k]


def analogue_conditions(cond: Conditions, k: int, vocab: Vocab) -> list[Analogue]:
    """Each system made by replacing one element of `cond.elements` with one of its k nearest among
    the vocabulary's elements. With a formula, the replacing element takes the replaced one's count."""
    if not cond.elements:
        return []
    counts = dict(zip(cond.elements, cond.formula)) if cond.formula else None
    out = []
    for _, back, elements in substituted_systems(cond.elements, k, vocab):
        ((new, old),) = back.items()
        formula = tuple(counts[back.get(e, e)] for e in elements) if counts else None
        out.append(Analogue(replace(cond, elements=elements, formula=formula), old, new))
    return out


def analogue_slot(index: int, share: float, n_analogues: int, repeats: int | None = None) -> int | None:
    """Which analogue (0..n_analogues-1) sample `index` of a run is drawn in; None: the requested
    system. A fixed function of the index, so that any subset of a run's batches (a resumed run,
    one process's share) draws what the whole run draws at those indices; the analogue samples are
    spread evenly (share 0.5: every other index) and take the analogues in turn, each at most
    `repeats` times (None: no cap)."""
    if n_analogues == 0 or math.floor((index + 1) * share) == math.floor(index * share):
        return None
    drawn = math.floor(index * share)  # analogue samples before this one
    if repeats is not None and drawn >= repeats * n_analogues:
        return None
    return drawn % n_analogues


def first_round(index: int, share: float, n_analogues: int) -> bool:
    """Whether sample `index` of a run is drawn in an analogue for the first time (the first pass of
    `analogue_slot` over the analogues), where `SamplingConfig.analogue_templates` puts the templates."""
    return analogue_slot(index, share, n_analogues) is not None and math.floor(index * share) < n_analogues


def substitute(tokenizer: CrystalTokenizer, seq: CrystalSequence, analogue: Analogue) -> CrystalSequence:
    """The sequence of the crystal `seq` describes (a sample drawn in `analogue`'s system) with
    `analogue.by` replaced by `analogue.replaced`: same sites, values and stability token, re-encoded
    canonically where the substituted crystal encodes (else in the sampled site order)."""
    return _relabelled(tokenizer, seq, {analogue.by: analogue.replaced})


def _relabelled(tokenizer: CrystalTokenizer, seq: CrystalSequence, back: dict[str, str],
                stability: str | None = None) -> CrystalSequence:
    """`seq` (a parsable sequence: sampled, or a training crystal's) with each element of `back`'s
    keys replaced by its value and the stability token `stability` (None: kept), re-encoded
    canonically where the relabelled crystal encodes, else in the given site order."""
    desc = tokenizer.parse(seq)
    desc = replace(desc, elements=tokenizer.vocab.by_z(back.get(e, e) for e in desc.elements),
                   sites=[replace(s, element=back.get(s.element, s.element)) for s in desc.sites],
                   stability=stability or desc.stability)
    relabelled = tokenizer.from_description(desc)
    try:
        canonical = tokenizer.encode(tokenizer.decode(relabelled))
    except (DecodeError, EncodeError, ValueError):
        return relabelled
    tokens = list(canonical.tokens)
    tokens[1] = desc.stability
    return CrystalSequence.from_tokens(tokens, canonical.values.tolist(), tokenizer.vocab)


def substituted_systems(elements: Sequence[str], k: int, vocab: Vocab, substitutions: int = 1
                        ) -> Iterator[tuple[int, dict[str, str], tuple[str, ...]]]:
    """The systems made by replacing up to `substitutions` of `elements` at once, each by one of its
    k nearest (`nearest_elements`), as (nearness rank, {new: replaced element}, system). The
    rank is the sum of the replacements' places in their nearest lists, plus k for each replacement
    beyond the first, so that every one-element system ranks before every two-element one."""
    candidates = [c for c in vocab.element_ids if c not in elements]
    nearest = {e: nearest_elements(e, candidates, k) for e in elements}
    for depth in range(1, substitutions + 1):
        for olds in combinations(elements, depth):
            for news in product(*(nearest[old] for old in olds)):
                if len(set(news)) < depth:
                    continue  # two elements replaced by the same one: a system of fewer elements
                rank = k * (depth - 1) + sum(nearest[old].index(new) for old, new in zip(olds, news))
                by = dict(zip(olds, news))
                yield rank, dict(zip(news, olds)), tuple(vocab.by_z(by.get(e, e) for e in elements))


def known_skeletons(cond: Conditions, k: int, index: FingerprintIndex, limits: Limits | None = None,
                    substitutions: int = 1, templates: bool = False) -> list[Analogue]:
    """The Wyckoff skeletons of the training crystals (`index`) of the systems made by replacing up to
    `substitutions` of `cond`'s elements by one of their k nearest (`substituted_systems`; `cond`
    names a chemical system, no formula), with the replacing elements put back, as conditions in the
    requested system: each distinct (space group, sites) once, those of the nearest replacements
    first, then the most frequent; with `templates`, each with its template (`Analogue.template`: the
    first training crystal of its nearest replacement, relabelled, which costs a decode and an encode
    each). Skeletons the grammar cannot sample within `limits` are left out."""
    vocab = index.vocab
    # skeleton -> (nearness rank, crystals, the nearest crystal and its replacements)
    found: dict[tuple, tuple[int, int, int, dict[str, str]]] = {}
    for rank, back, system in substituted_systems(cond.elements or (), k, vocab, substitutions):
        for entry in index.entries_of_system(system):
            desc = index.tokenizer.parse(index.sequence(entry))
            key = (desc.group.number, tuple(sorted((s.position.letter, back.get(s.element, s.element)) for s in desc.sites)))
            near, count, nearest, nearest_back = found.get(key, (rank, 0, entry, back))
            if rank < near:
                nearest, nearest_back = entry, back
            found[key] = (min(near, rank), count + 1, nearest, nearest_back)
    out = []
    for (number, sites), (_, _, entry, back) in sorted(found.items(), key=lambda kv: (kv[1][0], -kv[1][1], kv[0])):
        skeleton = replace(cond, spacegroup=number, sites=sites, complete_sites=False)
        try:
            check_conditions(vocab, skeleton, limits)
        except ValueError:
            continue
        if not templates:
            out.append(Analogue(skeleton, None, None))
            continue
        template = _relabelled(index.tokenizer, index.sequence(entry), back, cond.stability)
        out.append(Analogue(skeleton, None, None, template, str(index.material_ids[entry])))
    return out
