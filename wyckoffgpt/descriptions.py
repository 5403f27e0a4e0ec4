"""What a Wyckoff description says without decoding it: composition, density, crystal system, and
the prototype key used by the fingerprint index's stability proxy.

These read a `WyckoffDescription` (grammar.py) only; the one helper that starts from a Structure,
`structure_prototype`, re-encodes it through the tokenizer it is given.
"""
from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import TYPE_CHECKING

from pymatgen.core import Composition

from .decode import lattice_from_free
from .grammar import WyckoffDescription

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from .tokenizer import CrystalTokenizer

CRYSTAL_SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic")


def description_composition(desc: WyckoffDescription) -> Composition:
    """Composition of the conventional cell a Wyckoff description states (no decoding needed)."""
    counts: Counter[str] = Counter()
    for site in desc.sites:
        counts[site.element] += site.position.multiplicity
    return Composition(counts)


@lru_cache(maxsize=1)
def _g_per_cm3_per_amu_per_a3() -> float:
    from pymatgen.core.units import Length, Mass

    return float(Mass(1.0, "amu").to("g") / Length(1.0, "ang").to("cm") ** 3)


def description_density(desc: WyckoffDescription) -> float:
    """Mass density in g/cm³ of the crystal a description states (as pymatgen's Structure.density)."""
    volume = lattice_from_free(desc.group.crystal_system, desc.lattice).volume
    return float(description_composition(desc).weight) / volume * _g_per_cm3_per_amu_per_a3()


def crystal_system(spacegroup: int) -> str:
    """Crystal system of an international space-group number (1-230)."""
    for system, last in zip(CRYSTAL_SYSTEMS, (2, 15, 74, 142, 167, 194, 230)):
        if spacegroup <= last:
            return system
    raise ValueError(f"space group must be in 1-230, got {spacegroup}")


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
    from .symmetry import EncodeError

    try:
        return prototype_key(tokenizer.parse(tokenizer.encode(structure)))
    except EncodeError:
        return None
