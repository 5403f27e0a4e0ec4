"""Chemistry of elements and compositions: SMACT charge-balance screening, the generator's charge
checks, and the element properties a model can read beside its learned element embeddings.

Only pymatgen's Composition and Element and smact are needed here (no structure or symmetry
library), so the composition features of training (`composition.py`) can use them without pulling in
spglib.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import cache

from pymatgen.core import Composition, Element


def smact_valid(composition: Composition | str) -> bool:
    """SMACT screening of a composition: some assignment of common oxidation states is charge
    neutral and passes the Pauling electronegativity test; all-metal compositions (alloys) pass.
    These are `smact.screening.smact_validity`'s defaults (ICSD-2024 oxidation states)."""
    comp = Composition(composition) if isinstance(composition, str) else composition
    return _smact_valid_reduced(comp.reduced_formula)


@cache
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
# test; borides, carbides, silicides, pnictides and hydrides often are not (Er5Si3 and NdB6 contain
# none of these elements and still fail SMACT).
ANION_FORMERS = frozenset({"N", "O", "F", "S", "Cl", "Se", "Br", "Te", "I"})
# How strictly generation asks for charge balance (`charge_check`):
#   "ionic": a composition with an ANION_FORMERS element needs some charge-neutral assignment of
#            common oxidation states, one element may take two (Fe3O4, LiMn2O4); others pass.
#   "smact": every composition passes `smact_valid`.
#   "off":   no check.
# (How many training crystals fail each: benchmarks/quality.py's training row, in the model card.)
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


# What an element token can tell the model besides its learned embedding (WyckoffGPTConfig's
# element_properties): where the element sits in the periodic table and how it bonds, so that an
# element combination the model never saw starts from its chemical neighbours'.
ELEMENT_PROPERTIES = ("group", "period", "electronegativity", "atomic_radius", "mendeleev_number",
                      "lowest_common_oxidation_state", "highest_common_oxidation_state",
                      "s_block", "p_block", "d_block", "f_block")


def _raw_properties(symbol: str) -> list[float]:
    el = Element(symbol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns for every property it lacks (e.g. He's X)
        states = el.common_oxidation_states
        radius = el.atomic_radius
        return [float(el.group), float(el.row), float(el.X), math.nan if radius is None else float(radius),
                math.nan if el.mendeleev_no is None else float(el.mendeleev_no),
                float(min(states)) if states else 0.0, float(max(states)) if states else 0.0,
                *(float(el.block == b) for b in "spdf")]


def element_property_table(symbols: Sequence[str]) -> list[list[float]]:
    """One row of ELEMENT_PROPERTIES per symbol, from pymatgen (Pauling electronegativity, atomic
    radius in Å, no common oxidation state: 0), each column standardised over `symbols` to zero
    mean and unit variance; a value pymatgen lacks (noble gases' electronegativity) is the mean, 0."""
    raw = [_raw_properties(s) for s in symbols]
    columns = []
    for j in range(len(ELEMENT_PROPERTIES)):
        known = [r[j] for r in raw if not math.isnan(r[j])]
        mean = sum(known) / len(known)
        std = math.sqrt(sum((v - mean) ** 2 for v in known) / len(known)) or 1.0
        columns.append([0.0 if math.isnan(r[j]) else round((r[j] - mean) / std, 6) for r in raw])
    return [list(row) for row in zip(*columns)]
