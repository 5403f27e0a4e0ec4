"""Chemistry rules on compositions: SMACT charge-balance screening and the generator's charge checks.

Only pymatgen's Composition and smact are needed here (no structure or symmetry library), so the
composition features of training (`composition.py`) can use them without pulling in spglib.
"""
from __future__ import annotations

import warnings
from functools import cache

from pymatgen.core import Composition


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
