"""Quality metrics for generated crystals: SMACT validity, uniqueness, novelty and a stability proxy.

Structure comparisons use pymatgen's StructureMatcher with its default tolerances, and only ever
between structures of the same reduced formula (different formulas never match), which keeps the
work proportional to the number of same-formula pairs rather than to n².
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from pymatgen.core import Composition, Structure

from .decode import find_duplicates
from .grammar import WyckoffDescription
from .symmetry import EncodeError
from .tokenizer import CrystalTokenizer

if TYPE_CHECKING:
    from .fingerprints import FingerprintIndex


# -- composition -----------------------------------------------------------------------------------

def smact_valid(composition: Composition | str) -> bool:
    """SMACT screening of a composition: some assignment of common oxidation states is charge
    neutral and passes the Pauling electronegativity test; all-metal compositions (alloys) pass.
    These are `smact.screening.smact_validity`'s defaults (ICSD-2024 oxidation states)."""
    comp = Composition(composition) if isinstance(composition, str) else composition
    return _smact_valid_reduced(comp.reduced_formula)


@lru_cache(maxsize=None)
def _smact_valid_reduced(reduced_formula: str, mixed_valence: bool = False) -> bool:
    # The test depends only on the element ratios, so one answer per reduced formula serves all
    # the (many repeated) compositions of a sample set or of the training data.
    from smact.screening import smact_validity

    with warnings.catch_warnings():
        # SMACT gives up on mixed valence for huge formulas (e.g. Eu99Mg12B22) and says so each time.
        warnings.filterwarnings("ignore", message="Mixed-valence expansion")
        return bool(smact_validity(Composition(reduced_formula), mixed_valence=mixed_valence))


# Elements that are the anion of nearly every compound they form with metals (nitrides, oxides,
# chalcogenides, halides). Their compounds are ionic enough for oxidation-state balance to be a sound
# test; borides, carbides, silicides, pnictides and hydrides often are not: 4.3 % of the training
# crystals (Er5Si3, NdB6) contain none of these elements and still fail SMACT.
ANION_FORMERS = frozenset({"N", "O", "F", "S", "Cl", "Se", "Br", "Te", "I"})
# How strictly generation asks for charge balance (`charge_check`):
#   "ionic": a composition with an ANION_FORMERS element needs some charge-neutral assignment of
#            common oxidation states, one element may take two (Fe3O4, LiMn2O4); others pass.
#            2.4 % of the training crystals fail it (superoxides such as KO2, azides, polysulfides).
#   "smact": every composition passes `smact_valid` (8.2 % of the training crystals fail it).
#   "off":   no check.
CHARGE_CHECKS = ("ionic", "smact", "off")


def passes_charge_check(composition: Composition | str, check: str) -> bool:
    """Whether `composition` passes the `check` in CHARGE_CHECKS."""
    if check not in CHARGE_CHECKS:
        raise ValueError(f"charge check must be one of {', '.join(CHARGE_CHECKS)}, got {check!r}")
    if check == "off":
        return True
    comp = Composition(composition) if isinstance(composition, str) else composition
    if check == "smact":
        return _smact_valid_reduced(comp.reduced_formula)
    if ANION_FORMERS.isdisjoint(el.symbol for el in comp.elements):
        return True
    formula = comp.reduced_formula
    # The plain test first: its answer is cached for the charge_balanced column anyway, and most pass it.
    return _smact_valid_reduced(formula) or _smact_valid_reduced(formula, mixed_valence=True)


def description_composition(desc: WyckoffDescription) -> Composition:
    """Composition of the conventional cell a Wyckoff description states (no decoding needed)."""
    counts: Counter[str] = Counter()
    for site in desc.sites:
        counts[site.element] += site.position.multiplicity
    return Composition(counts)


# -- prototypes ------------------------------------------------------------------------------------

def prototype_key(desc: WyckoffDescription) -> str:
    """"formula|space group|sorted Wyckoff letter:element multiset", e.g. "NaCl|225|a:Cl b:Na".

    Free coordinates and the lattice are left out on purpose: two crystals with the same key are
    the same structure type with the same chemistry, which is what "this prototype is known to be
    stable" should mean."""
    formula = description_composition(desc).reduced_formula
    sites = " ".join(sorted(f"{s.position.letter}:{s.element}" for s in desc.sites))
    return f"{formula}|{desc.group.number}|{sites}"


def structure_prototype(structure: Structure, tokenizer: CrystalTokenizer) -> str | None:
    """Prototype key of a structure's canonical description (re-encoded, so the space group is the
    one spglib finds and the Wyckoff letters are the canonical choice among equivalent settings);
    None when the structure cannot be encoded."""
    try:
        return prototype_key(tokenizer.parse(tokenizer.encode(structure)))
    except EncodeError:
        return None


# -- sample-set metrics ----------------------------------------------------------------------------

def unique_flags(structures: Sequence[Structure]) -> list[bool]:
    """True for each structure that matches no earlier one (the first of each group of duplicates)."""
    return [match is None for match in find_duplicates(list(structures))]


def novel_flags(structures: Sequence[Structure], index: FingerprintIndex) -> list[bool]:
    """True for each structure that matches no training crystal of the index."""
    return [index.find_match(s) is None for s in structures]


def low_prototype_flags(keys: Sequence[str | None], index: FingerprintIndex) -> list[bool]:
    """True for each prototype key that occurs among the index's low-e_hull training crystals."""
    known = index.low_prototypes
    return [k is not None and k in known for k in keys]


def fraction(flags: Sequence[bool]) -> float | None:
    """Mean of booleans; None for an empty list (a rate of nothing is undefined, not 0)."""
    return sum(map(bool, flags)) / len(flags) if flags else None
