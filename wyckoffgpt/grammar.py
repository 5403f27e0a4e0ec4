"""The grammar of a crystal token sequence, as an incremental parser.

    <bos> stability n:k  E1 .. Ek (strictly increasing Z)  sg:N
    ( orbit-token element [x] [y] [z] )+      # the free coordinates of that position, in order
    lattice values (those free for the crystal system, in a b c alpha beta gamma order)  <eos>

The same parser validates a whole sequence for the decoder (`parse`) and, one token at a time,
tells the sampler which tokens may come next (`allowed_mask`), so a sampled sequence can
always be decoded. A position without free parameters may appear once; every declared
element must be used by some site before the lattice starts.

For sampling, a parser also takes `Conditions` (forced stability, elements, space group) and
`Limits` (sites and atoms per cell); `allowed_mask` then excludes every token after which no
complete sequence within them exists, and `value_bounds` keeps sampled cell angles where the cell
exists. It also keeps the sites in canonical order, the order every encoded crystal has: by Wyckoff
position (ITA letter order), then by atomic number. Without it a model could put a heavy element on
a position while a lighter declared element was still missing, a state that no training sequence
continues from: the model, unable to place the missing element "in order", kept adding sites of the
others, without end. `parse` uses none of this: it accepts every grammatical sequence.

Two conditions fix more than the prompt. An exact formula (`Conditions.formula`): a site, an element
or the lattice is allowed only when the atoms each element still needs, for some allowed number of
formula units, can be made up from the multiplicities of the positions still available
(stoichiometry.py), and space groups that cannot hold the formula at all are masked. Forced Wyckoff
sites (`Conditions.sites`): the forced sites are taken in canonical order; with `complete_sites`
other sites may come between them, as long as the order leaves every forced site its place and the
limits leave room for those still missing.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import cache

import numpy as np

from .stoichiometry import StoichiometryBudget
from .vocab import ANGLE_TOKENS, COORD_TOKENS, SpaceGroupTable, Vocab, WyckoffPosition


class DecodeError(ValueError):
    """A token sequence that does not describe a crystal; the message names the problem."""


@dataclass
class Site:
    position: WyckoffPosition
    element: str
    free_values: list[float] = field(default_factory=list)


@dataclass
class WyckoffDescription:
    """A crystal in Wyckoff form: what a sequence says, before orbits are expanded."""

    stability: str  # token string, e.g. "ehull:low"
    elements: list[str]
    group: SpaceGroupTable
    sites: list[Site]
    lattice: dict[str, float]  # only the free parameters


@dataclass(frozen=True)
class Limits:
    """Bounds a sampled sequence must respect. The defaults admit every crystal of the training data
    (data_prep keeps at most 20 Wyckoff sites; MPTS-52 crystals have up to 52 atoms per primitive
    cell, so up to 208 in a face-centred conventional cell) with room for a few more sites."""

    max_sites: int = 24
    max_atoms: int = 208

    def __post_init__(self) -> None:
        if self.max_sites < 1 or self.max_atoms < 1:
            raise ValueError(f"limits must be positive (got max_sites={self.max_sites}, max_atoms={self.max_atoms})")


@dataclass(frozen=True)
class Conditions:
    """Forced parts of a sequence; None leaves that part to the sampler."""

    stability: str | None = None  # token string, e.g. "ehull:low"
    elements: tuple[str, ...] | None = None  # in increasing atomic number
    spacegroup: int | None = None
    # Exact reduced formula: atoms per formula unit of each of `elements` (same order). Every
    # sample then holds k formula units per cell, k from `formula_units` (None: any k that fits
    # the atom limit).
    formula: tuple[int, ...] | None = None
    formula_units: tuple[int, ...] | None = None
    # Forced Wyckoff sites (letter, element) of `spacegroup`, e.g. (("a", "Na"), ("b", "Cl")); the
    # declared elements are exactly theirs. With complete_sites the sampler may add further sites,
    # else the sites are exactly these.
    sites: tuple[tuple[str, str], ...] | None = None
    complete_sites: bool = False

    def formula_text(self) -> str:
        from pymatgen.core import Composition

        return Composition(dict(zip(self.elements or (), self.formula or ()))).reduced_formula


_NO_CONDITIONS = Conditions()


# -- constrained decoding ------------------------------------------------------------------------
# The sampler masks every token after which no valid, complete sequence exists, so it can never
# reach a dead end. The invariant kept at every step: the declared elements not yet placed can still
# be placed, each on its own site, within the remaining site and atom budget.

# Bounds on sampled cell angles: well inside (0, 180) so that every accepted cell has a clearly
# positive volume (the decoder rejects cells with a vanishing volume factor).
ANGLE_BOUNDS = (5.0, 175.0)
# Lengths need only be positive; this floor keeps them so in float32 too.
LENGTH_MIN = 1e-6
# Margin (degrees) kept from the triangle inequalities that the third triclinic angle must satisfy.
ANGLE_MARGIN = 1.0


class _GroupBudget:
    """The Wyckoff positions of one group as arrays, and the fewest atoms that more sites need when
    they must follow the canonical site order (see `SequenceParser`)."""

    def __init__(self, vocab: Vocab, group: SpaceGroupTable):
        positions = group.positions  # in ITA order: positions[i].index == i
        self.orbit_ids = np.array([vocab.token_to_id[p.orbit] for p in positions], dtype=np.int64)
        self.mults = [p.multiplicity for p in positions]
        self.repeatable = [p.repeatable for p in positions]
        # After a site on position i (slot i + 1; slot 0: before any site): the multiplicities of the
        # fixed positions further on, ascending, and the smallest repeatable one further on (0: none).
        # Every group ends with its general position, which is repeatable.
        self._later_fixed = [sorted(m for m, r in zip(self.mults[i + 1:], self.repeatable[i + 1:]) if not r)
                             for i in range(-1, len(positions))]
        self._later_repeatable = [min((m for m, r in zip(self.mults[i + 1:], self.repeatable[i + 1:]) if r), default=0)
                                  for i in range(-1, len(positions))]
        self._cache: dict[tuple[int, int, int], float] = {}

    def completion_atoms(self, after: int, n_low: int, n_high: int) -> float:
        """Fewest atoms of n_low + n_high more sites (one per missing element) after a site on
        position `after` (-1: no site yet): each on a position further on (a fixed one once), except
        that the n_high elements of higher Z than that site's may also repeat its position when it is
        repeatable. inf when impossible."""
        key = (after, n_low, n_high)
        cost = self._cache.get(key)
        if cost is None:
            n = n_low + n_high
            rep = self._later_repeatable[after + 1]
            later = sorted(self._later_fixed[after + 1][:n] + [rep] * (n if rep else 0))
            reuse = [self.mults[after]] * n_high if after >= 0 and self.repeatable[after] else []
            pool = sorted(later[:n] + reuse)
            cost = math.inf if len(later) < n_low or len(pool) < n else float(sum(pool[:n]))
            self._cache[key] = cost
        return cost


class _Rules:
    """Masks and budgets shared by every parser of one vocabulary and one set of limits."""

    def __init__(self, vocab: Vocab, limits: Limits):
        self.vocab = vocab
        self.limits = limits
        self.size = len(vocab)
        self.budgets = {n: _GroupBudget(vocab, vocab.group(n)) for n in vocab.sg_ids}
        self.stability = self._mask(vocab.stability_ids)
        self.elements_by_z = np.array(sorted(vocab.element_z, key=vocab.element_z.get), dtype=np.int64)
        self.z_rank = {int(i): r for r, i in enumerate(self.elements_by_z)}
        self.sg_for_arity = {k: self._mask(vocab.sg_ids[n] for n in vocab.sg_ids if self.group_fits(n, k))
                             for k in vocab.arity_ids}
        self.arity_any = self._mask(i for k, i in vocab.arity_ids.items()
                                    if k <= len(self.elements_by_z) and self.sg_for_arity[k].any())
        self._one_hot: dict[int, np.ndarray] = {}
        self._stoich: dict[int, StoichiometryBudget] = {}
        self._formula_sgs: dict[tuple, np.ndarray] = {}
        self._formula_cache: dict[tuple, object] = {}

    def stoichiometry(self, number: int) -> StoichiometryBudget:
        b = self._stoich.get(number)
        if b is None:
            b = self._stoich[number] = StoichiometryBudget(self.vocab.group(number))
        return b

    def formula_targets(self, c: Conditions) -> list[tuple[int, ...]]:
        """Atoms per element (in `c.elements` order) of each allowed number of formula units."""
        key = ("targets", c.formula, c.formula_units)
        targets = self._formula_cache.get(key)
        if targets is None:
            per_unit = sum(c.formula)
            units = c.formula_units or range(1, self.limits.max_atoms // per_unit + 1)
            targets = self._formula_cache[key] = [tuple(k * n for n in c.formula) for k in sorted(set(units))
                                                  if k * per_unit <= self.limits.max_atoms]
        return targets

    def formula_fits(self, c: Conditions, number: int, after: int, last_z: int, placed: tuple[int, ...],
                     sites_left: int) -> bool:
        """Can the atoms still missing from some allowed cell content be placed, after a site of
        atomic number last_z on position `after`, in at most sites_left more sites?"""
        key = (c.elements, c.formula, c.formula_units, number, after, last_z, placed, sites_left)
        fits = self._formula_cache.get(key)
        if fits is None:
            z = [self.vocab.element_z[self.vocab.element_ids[e]] for e in c.elements]
            budget = self.stoichiometry(number)
            fits = self._formula_cache[key] = any(
                budget.min_sites(after, last_z, tuple((ze, t - p) for ze, t, p in zip(z, target, placed) if t > p))
                <= sites_left
                for target in self.formula_targets(c) if all(p <= t for p, t in zip(placed, target)))
        return fits

    def formula_spacegroups(self, c: Conditions) -> np.ndarray:
        """Mask of the space-group tokens whose positions can hold the formula within the limits."""
        key = (c.elements, c.formula, c.formula_units)
        mask = self._formula_sgs.get(key)
        if mask is None:
            zero = tuple(0 for _ in c.formula)
            mask = self._formula_sgs[key] = self._mask(
                self.vocab.sg_ids[n] for n in self.vocab.sg_ids
                if self.formula_fits(c, n, -1, -1, zero, self.limits.max_sites))
        return mask

    def _mask(self, ids) -> np.ndarray:
        m = np.zeros(self.size, dtype=bool)
        m[list(ids)] = True
        m.setflags(write=False)
        return m

    def one_hot(self, token_id: int) -> np.ndarray:
        m = self._one_hot.get(token_id)
        if m is None:
            m = self._one_hot[token_id] = self._mask([token_id])
        return m

    def group_fits(self, number: int, n_elements: int) -> bool:
        """Can group `number` hold n_elements elements, each on its own site, within the limits?"""
        lim = self.limits
        return n_elements <= lim.max_sites and self.budgets[number].completion_atoms(-1, n_elements, 0) <= lim.max_atoms


@cache
def _rules(vocab: Vocab, limits: Limits) -> _Rules:
    return _Rules(vocab, limits)


def check_conditions(vocab: Vocab, conditions: Conditions, limits: Limits | None = None) -> None:
    """Raise ValueError (message naming the problem) unless some sequence satisfies the conditions."""
    rules = _rules(vocab, limits or Limits())
    c = conditions
    if c.stability is not None and vocab.token_to_id.get(c.stability) not in vocab.stability_ids:
        raise ValueError(f"unknown stability token {c.stability!r}")
    if c.elements is not None:
        if not c.elements:
            raise ValueError("at least one element is needed")
        missing = [e for e in c.elements if e not in vocab.element_ids]
        if missing:
            raise ValueError(f"element {missing[0]} is not in the model's vocabulary")
        z = [vocab.element_z[vocab.element_ids[e]] for e in c.elements]
        if any(b <= a for a, b in zip(z, z[1:])):
            raise ValueError("elements must be distinct and listed in increasing atomic number")
        if len(c.elements) not in vocab.arity_ids:
            raise ValueError(f"{len(c.elements)} elements; the vocabulary allows at most {vocab.max_arity}")
    if c.spacegroup is not None:
        if c.spacegroup not in vocab.sg_ids:
            raise ValueError(f"space group {c.spacegroup} is not in 1-230")
        k = len(c.elements) if c.elements is not None else 1
        if not rules.group_fits(c.spacegroup, k):
            raise ValueError(f"space group {c.spacegroup} cannot hold {k} elements within {rules.limits.max_sites} "
                             f"sites and {rules.limits.max_atoms} atoms per cell")
    elif c.elements is not None and not rules.sg_for_arity[len(c.elements)].any():
        raise ValueError(f"no space group holds {len(c.elements)} elements within the limits")
    if c.formula is not None:
        _check_formula(vocab, rules, c)
    if c.sites is not None:
        _check_sites(vocab, rules, c)


def _check_formula(vocab: Vocab, rules: _Rules, c: Conditions) -> None:
    if c.elements is None or len(c.formula) != len(c.elements) or any(n < 1 for n in c.formula):
        raise ValueError("a formula needs a positive atom count for each of its elements")
    if c.sites is not None:
        raise ValueError("give either a formula or Wyckoff sites, not both")
    if c.formula_units is not None and (not c.formula_units or any(k < 1 for k in c.formula_units)):
        raise ValueError("formula units must be positive integers")
    lim = rules.limits
    units = ", ".join(map(str, sorted(set(c.formula_units)))) if c.formula_units else "any number of"
    where = (f"with {units} formula units within {lim.max_sites} sites and {lim.max_atoms} atoms per cell")
    if not rules.formula_targets(c):
        raise ValueError(f"{c.formula_text()} does not fit {where}")
    mask = rules.formula_spacegroups(c)
    if c.spacegroup is not None and not mask[vocab.sg_ids[c.spacegroup]]:
        raise ValueError(f"space group {c.spacegroup} cannot hold {c.formula_text()} {where}")
    if not mask.any():
        raise ValueError(f"no space group can hold {c.formula_text()} {where}")


def _check_sites(vocab: Vocab, rules: _Rules, c: Conditions) -> None:
    if c.spacegroup is None:
        raise ValueError("Wyckoff sites need a space group")
    group = vocab.group(c.spacegroup)
    for letter, element in c.sites:
        if letter not in group.by_letter:
            raise ValueError(f"space group {c.spacegroup} has no Wyckoff position {letter!r} "
                             f"(it has {''.join(p.letter for p in group.positions)})")
        if element not in vocab.element_ids:
            raise ValueError(f"element {element} is not in the model's vocabulary")
    if c.elements is None or set(c.elements) != {e for _, e in c.sites}:
        raise ValueError("the declared elements must be exactly those of the Wyckoff sites")
    fixed = [letter for letter, _ in c.sites if not group.by_letter[letter].repeatable]
    if len(fixed) != len(set(fixed)):
        twice = next(x for x in fixed if fixed.count(x) > 1)
        raise ValueError(f"Wyckoff position {group.by_letter[twice].multiplicity}{twice} of space group "
                         f"{c.spacegroup} has no free parameter and can hold one site only")
    atoms = sum(group.by_letter[letter].multiplicity for letter, _ in c.sites)
    lim = rules.limits
    if len(c.sites) > lim.max_sites or atoms > lim.max_atoms:
        raise ValueError(f"{len(c.sites)} sites with {atoms} atoms exceed the limits "
                         f"({lim.max_sites} sites, {lim.max_atoms} atoms per cell)")


class Phase(Enum):
    """What a parser expects next, in sequence order; the value names it in error messages."""

    # Members are singletons, so identity hashing is exact, and it keeps the two handler look-ups per
    # sampled token in C (Enum hashes the member's name in a Python-level method).
    __hash__ = object.__hash__

    BOS = "bos"
    STABILITY = "stability"
    ARITY = "arity"  # n:k
    ELEMENTS = "elements"  # the k declared elements
    SPACEGROUP = "spacegroup"
    SITE_OR_LATTICE = "site_or_lattice"  # an orbit token, or the first free lattice parameter
    SITE_ELEMENT = "site_element"
    SITE_VALUES = "site_values"  # the free coordinates of the last site
    LATTICE = "lattice"  # the remaining free lattice parameters
    EOS = "eos"
    DONE = "done"  # only padding may follow


class SequenceParser:
    """Consumes (token id, value) pairs; raises DecodeError at the first invalid one.

    Each Phase has its handlers `_feed_<phase>` (consume a token) and `_mask_<phase>` (the tokens
    allowed next), found by name when the class is made, so a phase without one fails at import."""

    _FEEDERS: dict[Phase, Callable[..., None]]  # set below the class, by _handlers
    _MASKS: dict[Phase, Callable[..., np.ndarray]]

    def __init__(self, vocab: Vocab, limits: Limits | None = None, conditions: Conditions | None = None):
        """With `limits` or `conditions`, `feed` also rejects every token `allowed_mask` excludes."""
        self.vocab = vocab
        self.limits = limits
        self.conditions = conditions
        self._constrained = limits is not None or conditions is not None
        self._rules: _Rules | None = None
        self._mask_at = -1
        self._mask: np.ndarray | None = None
        self.used_elements: set[str] = set()
        self.phase = Phase.BOS
        self.stability: str | None = None
        self.arity = 0
        self.elements: list[str] = []
        self.group: SpaceGroupTable | None = None
        self.sites: list[Site] = []
        # Token positions where each site and the lattice begin: where the sampler can resume from.
        self.site_starts: list[int] = []
        self.lattice_start: int | None = None
        self.used_fixed: set[str] = set()
        self.n_atoms = 0
        self.lattice: dict[str, float] = {}
        self.n_fed = 0
        self._tok = vocab.tokens

    def feed(self, token_id: int, value: float = math.nan) -> None:
        if self._constrained and 0 <= token_id < len(self.vocab):
            self._check_allowed(token_id, value)
        self._feed(token_id, value)
        self.n_fed += 1

    def _feed(self, token_id: int, value: float) -> None:
        if not 0 <= token_id < len(self.vocab):
            raise DecodeError(f"token id {token_id} outside the vocabulary (0..{len(self.vocab) - 1})")
        tok = self._tok[token_id]
        self._FEEDERS[self.phase](self, token_id, tok, value, f"token {tok!r} at position {self.n_fed}")

    # One `_feed_<phase>` per Phase: check the token against the grammar, record it, move the phase on.

    def _feed_bos(self, token_id: int, tok: str, value: float, where: str) -> None:
        self._expect(token_id == self.vocab.bos_id, f"{where}: sequence must start with <bos>")
        self.phase = Phase.STABILITY

    def _feed_stability(self, token_id: int, tok: str, value: float, where: str) -> None:
        self._expect(token_id in self.vocab.stability_ids, f"{where}: expected a stability token")
        self.stability, self.phase = tok, Phase.ARITY

    def _feed_arity(self, token_id: int, tok: str, value: float, where: str) -> None:
        self._expect(tok.startswith("n:"), f"{where}: expected the number of elements (n:k)")
        self.arity, self.phase = int(tok[2:]), Phase.ELEMENTS

    def _feed_elements(self, token_id: int, tok: str, value: float, where: str) -> None:
        v = self.vocab
        self._expect(token_id in v.element_z, f"{where}: expected an element")
        if self.elements:
            self._expect(v.element_z[token_id] > v.element_z[v.token_to_id[self.elements[-1]]],
                         f"{where}: elements must be listed once each, in increasing atomic number")
        self.elements.append(tok)
        if len(self.elements) == self.arity:
            self.phase = Phase.SPACEGROUP

    def _feed_spacegroup(self, token_id: int, tok: str, value: float, where: str) -> None:
        self._expect(tok.startswith("sg:"), f"{where}: expected a space group token")
        self.group, self.phase = self.vocab.group(int(tok[3:])), Phase.SITE_OR_LATTICE

    def _feed_site_or_lattice(self, token_id: int, tok: str, value: float, where: str) -> None:
        if tok in self.group.by_orbit:
            self._start_site(self.group.by_orbit[tok], tok, where)
        elif tok == self.group.lattice_free[0]:
            self._start_lattice(token_id, tok, value, where)
        elif token_id in self.vocab.orbit_ids.values():
            raise DecodeError(f"{where}: Wyckoff orbit not in space group {self.group.number}")
        else:
            raise DecodeError(f"{where}: expected a Wyckoff orbit of space group {self.group.number} "
                              f"or lattice parameter {self.group.lattice_free[0]!r}")

    def _start_site(self, pos: WyckoffPosition, tok: str, where: str) -> None:
        self._expect(pos.repeatable or tok not in self.used_fixed,
                     f"{where}: Wyckoff position {pos.multiplicity}{pos.letter} has no free parameter "
                     f"and is already occupied")
        if not pos.repeatable:
            self.used_fixed.add(tok)
        self.sites.append(Site(pos, ""))
        self.site_starts.append(self.n_fed)
        self.n_atoms += pos.multiplicity
        self.phase = Phase.SITE_ELEMENT

    def _start_lattice(self, token_id: int, tok: str, value: float, where: str) -> None:
        self._expect(bool(self.sites), f"{where}: lattice before any Wyckoff site")
        missing = set(self.elements) - {s.element for s in self.sites}
        self._expect(not missing, f"{where}: declared elements {sorted(missing)} occupy no site")
        self.phase, self.lattice_start = Phase.LATTICE, self.n_fed
        self._feed_lattice(token_id, tok, value, where)

    def _feed_site_element(self, token_id: int, tok: str, value: float, where: str) -> None:
        self._expect(tok in self.elements, f"{where}: expected one of the declared elements {self.elements}")
        site = self.sites[-1]
        site.element = tok
        self.used_elements.add(tok)
        self.phase = Phase.SITE_VALUES if site.position.free else Phase.SITE_OR_LATTICE

    def _feed_site_values(self, token_id: int, tok: str, value: float, where: str) -> None:
        site = self.sites[-1]
        want = site.position.free[len(site.free_values)]
        self._expect(tok == want, f"{where}: expected free coordinate {want!r}")
        self._expect(math.isfinite(value), f"{where}: coordinate value {value!r} is not finite")
        site.free_values.append(value % 1.0)
        if len(site.free_values) == len(site.position.free):
            self.phase = Phase.SITE_OR_LATTICE

    def _feed_lattice(self, token_id: int, tok: str, value: float, where: str) -> None:
        want = self.group.lattice_free[len(self.lattice)]
        self._expect(tok == want, f"{where}: expected lattice parameter {want!r}")
        self._expect(math.isfinite(value), f"{where}: lattice value {value!r} is not finite")
        if tok in ANGLE_TOKENS:
            self._expect(0.0 < value < 180.0, f"{where}: angle {value} outside (0, 180) degrees")
        else:
            self._expect(0.0 < value, f"{where}: lattice length {value} is not positive")
        self.lattice[tok] = float(value)
        if len(self.lattice) == len(self.group.lattice_free):
            self.phase = Phase.EOS

    def _feed_eos(self, token_id: int, tok: str, value: float, where: str) -> None:
        self._expect(token_id == self.vocab.eos_id, f"{where}: expected <eos> after the lattice")
        self.phase = Phase.DONE

    def _feed_done(self, token_id: int, tok: str, value: float, where: str) -> None:
        self._expect(token_id == self.vocab.pad_id, f"{where}: tokens after <eos>")  # only padding may follow

    # -- constrained decoding: what may come next --------------------------------------------------

    def allowed_mask(self) -> np.ndarray:
        """Tokens that may come next such that the sequence can still be completed (read-only array)."""
        if self._mask_at == self.n_fed:
            return self._mask
        if self._rules is None:
            self._rules = _rules(self.vocab, self.limits or Limits())
        mask = self._MASKS[self.phase](self, self._rules, self.conditions or _NO_CONDITIONS)
        self._mask_at, self._mask = self.n_fed, mask
        return mask

    # One `_mask_<phase>` per Phase: the tokens allowed next in that phase.

    def _mask_bos(self, rules: _Rules, c: Conditions) -> np.ndarray:
        return rules.one_hot(self.vocab.bos_id)

    def _mask_stability(self, rules: _Rules, c: Conditions) -> np.ndarray:
        return rules.one_hot(self.vocab.token_to_id[c.stability]) if c.stability else rules.stability

    def _mask_arity(self, rules: _Rules, c: Conditions) -> np.ndarray:
        v = self.vocab
        if c.elements is not None:
            return rules.one_hot(v.arity_ids[len(c.elements)])
        if c.spacegroup is not None:
            return rules._mask(i for k, i in v.arity_ids.items() if rules.group_fits(c.spacegroup, k))
        return rules.arity_any

    def _mask_elements(self, rules: _Rules, c: Conditions) -> np.ndarray:
        v = self.vocab
        if c.elements is not None:
            return rules.one_hot(v.element_ids[c.elements[len(self.elements)]])
        # Strictly increasing Z, leaving enough heavier elements for the rest of the declared arity.
        start = rules.z_rank[v.element_ids[self.elements[-1]]] + 1 if self.elements else 0
        stop = len(rules.elements_by_z) - (self.arity - len(self.elements) - 1)
        mask = np.zeros(rules.size, dtype=bool)
        mask[rules.elements_by_z[start:stop]] = True
        return mask

    def _mask_spacegroup(self, rules: _Rules, c: Conditions) -> np.ndarray:
        if c.spacegroup is not None:
            return rules.one_hot(self.vocab.sg_ids[c.spacegroup])
        if c.formula is not None:
            return rules.formula_spacegroups(c)
        return rules.sg_for_arity[self.arity]

    def _mask_site_or_lattice(self, rules: _Rules, c: Conditions) -> np.ndarray:
        if c.formula is not None:
            return self._formula_site_mask(rules, c)
        if c.sites is not None:
            return self._forced_site_mask(rules, c)
        return self._site_mask(rules)

    def _mask_site_element(self, rules: _Rules, c: Conditions) -> np.ndarray:
        if c.formula is not None:
            return self._formula_element_mask(rules, c)
        if c.sites is not None:
            return self._forced_element_mask(rules, c)
        return self._element_mask(rules)

    def _mask_site_values(self, rules: _Rules, c: Conditions) -> np.ndarray:
        site = self.sites[-1]
        return rules.one_hot(self.vocab.token_to_id[site.position.free[len(site.free_values)]])

    def _mask_lattice(self, rules: _Rules, c: Conditions) -> np.ndarray:
        return rules.one_hot(self.vocab.token_to_id[self.group.lattice_free[len(self.lattice)]])

    def _mask_eos(self, rules: _Rules, c: Conditions) -> np.ndarray:
        return rules.one_hot(self.vocab.eos_id)

    def _mask_done(self, rules: _Rules, c: Conditions) -> np.ndarray:
        return rules.one_hot(self.vocab.pad_id)

    def _check_allowed(self, token_id: int, value: float) -> None:
        tok = self._tok[token_id]
        if not self.allowed_mask()[token_id]:
            raise DecodeError(f"token {tok!r} at position {self.n_fed}: excluded by the conditions or limits")
        if tok in ANGLE_TOKENS:
            lo, hi = self.value_bounds(token_id)
            if not lo <= value <= hi:
                raise DecodeError(f"angle {tok}={value} at position {self.n_fed}: outside [{lo:.6g}, {hi:.6g}], "
                                  f"the range that keeps the cell valid")

    def _site_mask(self, rules: _Rules) -> np.ndarray:
        lim, b = rules.limits, rules.budgets[self.group.number]
        last, last_z = self._order_key(len(self.sites))
        sites_left = lim.max_sites - len(self.sites) - 1  # after this site
        mask = np.zeros(rules.size, dtype=bool)
        for i in range(max(last, 0), len(b.mults)):
            if i == last and not b.repeatable[i]:
                continue  # a fixed position holds one site
            atoms_left = lim.max_atoms - self.n_atoms - b.mults[i]
            if sites_left >= 0 and atoms_left >= 0 and self._completable(b, i, last_z if i == last else -1,
                                                                         atoms_left, sites_left):
                mask[b.orbit_ids[i]] = True
        if self.sites and len(self.used_elements) == len(self.elements):
            mask[self.vocab.token_to_id[self.group.lattice_free[0]]] = True
        return mask

    def _element_mask(self, rules: _Rules) -> np.ndarray:
        lim, b = rules.limits, rules.budgets[self.group.number]
        i = self.sites[-1].position.index
        last, last_z = self._order_key(len(self.sites) - 1)
        min_z = last_z if i == last else -1
        atoms_left, sites_left = lim.max_atoms - self.n_atoms, lim.max_sites - len(self.sites)
        z = self.vocab.element_z
        ids = self.vocab.element_ids
        missing = [z[ids[e]] for e in self.elements if e not in self.used_elements]
        mask = np.zeros(rules.size, dtype=bool)
        for e in self.elements:
            ze = z[ids[e]]
            rest = [m for m in missing if m != ze]
            if ze >= min_z and len(rest) <= sites_left and b.completion_atoms(
                    i, sum(m < ze for m in rest), sum(m > ze for m in rest)) <= atoms_left:
                mask[ids[e]] = True
        return mask

    # -- exact formula (Conditions.formula) -------------------------------------------------------

    def _placed(self, c: Conditions, n_sites: int) -> list[int]:
        """Atoms of each of c.elements on the first n_sites sites."""
        placed = dict.fromkeys(c.elements, 0)
        for site in self.sites[:n_sites]:
            placed[site.element] += site.position.multiplicity
        return [placed[e] for e in c.elements]

    def _formula_site_fits(self, rules: _Rules, c: Conditions, i: int, k: int, placed: list[int],
                           sites_left: int) -> bool:
        """Does putting element c.elements[k] on position i keep the formula reachable?"""
        after = list(placed)
        after[k] += rules.budgets[self.group.number].mults[i]
        z = self.vocab.element_z[self.vocab.element_ids[c.elements[k]]]
        return sites_left >= 0 and rules.formula_fits(c, self.group.number, i, z, tuple(after), sites_left)

    def _formula_site_mask(self, rules: _Rules, c: Conditions) -> np.ndarray:
        b = rules.budgets[self.group.number]
        last, last_z = self._order_key(len(self.sites))
        sites_left = rules.limits.max_sites - len(self.sites) - 1
        placed = self._placed(c, len(self.sites))
        z = [self.vocab.element_z[self.vocab.element_ids[e]] for e in c.elements]
        mask = np.zeros(rules.size, dtype=bool)
        for i in range(max(last, 0), len(b.mults)):
            if i == last and not b.repeatable[i]:
                continue
            if any(self._formula_site_fits(rules, c, i, k, placed, sites_left)
                   for k in range(len(z)) if i != last or z[k] >= last_z):
                mask[b.orbit_ids[i]] = True
        if self.sites and tuple(placed) in rules.formula_targets(c):
            mask[self.vocab.token_to_id[self.group.lattice_free[0]]] = True
        return mask

    def _formula_element_mask(self, rules: _Rules, c: Conditions) -> np.ndarray:
        i = self.sites[-1].position.index
        last, last_z = self._order_key(len(self.sites) - 1)
        sites_left = rules.limits.max_sites - len(self.sites)
        placed = self._placed(c, len(self.sites) - 1)
        mask = np.zeros(rules.size, dtype=bool)
        for k, e in enumerate(c.elements):
            ze = self.vocab.element_z[self.vocab.element_ids[e]]
            if (i != last or ze >= last_z) and self._formula_site_fits(rules, c, i, k, placed, sites_left):
                mask[self.vocab.element_ids[e]] = True
        return mask

    # -- forced Wyckoff sites (Conditions.sites) ----------------------------------------------------

    def _missing_sites(self, c: Conditions, n_sites: int) -> list[tuple[int, int]]:
        """(position index, Z) of the forced sites not among the first n_sites sites, in canonical order."""
        z, ids = self.vocab.element_z, self.vocab.element_ids
        placed = [(s.position.index, z[ids[s.element]]) for s in self.sites[:n_sites]]
        missing = []
        for key in sorted((self.group.by_letter[letter].index, z[ids[e]]) for letter, e in c.sites):
            if key in placed:
                placed.remove(key)
            else:
                missing.append(key)
        return missing

    def _forced_site_ok(self, rules: _Rules, c: Conditions, i: int, ze: int, n_sites: int) -> bool:
        """May a site (position i, atomic number ze) follow the first n_sites sites, leaving room and
        canonical order for the forced sites still missing?"""
        missing = self._missing_sites(c, n_sites)
        if missing and (i, ze) == missing[0]:
            return True
        if not c.complete_sites or (missing and (i, ze) > missing[0]):
            return False
        b, lim = rules.budgets[self.group.number], rules.limits
        if missing and i == missing[0][0] and not b.repeatable[i]:
            return False  # would take the fixed position a forced site needs
        atoms = sum(s.position.multiplicity for s in self.sites[:n_sites]) + b.mults[i]
        return (n_sites + 1 + len(missing) <= lim.max_sites
                and atoms + sum(b.mults[j] for j, _ in missing) <= lim.max_atoms)

    def _forced_site_mask(self, rules: _Rules, c: Conditions) -> np.ndarray:
        b = rules.budgets[self.group.number]
        last, last_z = self._order_key(len(self.sites))
        z = sorted(self.vocab.element_z[self.vocab.element_ids[e]] for e in c.elements)
        mask = np.zeros(rules.size, dtype=bool)
        for i in range(max(last, 0), len(b.mults)):
            if i == last and not b.repeatable[i]:
                continue
            if any(self._forced_site_ok(rules, c, i, ze, len(self.sites)) for ze in z if i != last or ze >= last_z):
                mask[b.orbit_ids[i]] = True
        if self.sites and not self._missing_sites(c, len(self.sites)):
            mask[self.vocab.token_to_id[self.group.lattice_free[0]]] = True
        return mask

    def _forced_element_mask(self, rules: _Rules, c: Conditions) -> np.ndarray:
        i = self.sites[-1].position.index
        last, last_z = self._order_key(len(self.sites) - 1)
        mask = np.zeros(rules.size, dtype=bool)
        for e in c.elements:
            ze = self.vocab.element_z[self.vocab.element_ids[e]]
            if (i != last or ze >= last_z) and self._forced_site_ok(rules, c, i, ze, len(self.sites) - 1):
                mask[self.vocab.element_ids[e]] = True
        return mask

    def _order_key(self, n_sites: int) -> tuple[int, int]:
        """(position index, Z) of site n_sites - 1, the one the next site must not precede; (-1, -1)
        before any site."""
        if not n_sites:
            return -1, -1
        site = self.sites[n_sites - 1]
        return site.position.index, self.vocab.element_z[self.vocab.element_ids[site.element]]

    def _completable(self, b: _GroupBudget, i: int, min_z: int, atoms_left: int, sites_left: int) -> bool:
        """Can a site on position i take some declared element of Z >= min_z such that the elements
        still missing after it fit, in canonical order, within the budgets? The best choices are the
        lightest eligible missing element and the lightest eligible placed one: every other choice
        leaves more missing elements lighter than the site's, which cannot reuse its position."""
        z, ids = self.vocab.element_z, self.vocab.element_ids
        missing = sorted(z[ids[e]] for e in self.elements if e not in self.used_elements)
        if not missing:
            return True  # any eligible element; the last site's own element always is
        placed = sorted(z[ids[e]] for e in self.used_elements)
        for pool, n_rest in ((missing, len(missing) - 1), (placed, len(missing))):
            ze = next((v for v in pool if v >= min_z), None)
            if ze is None or n_rest > sites_left:
                continue
            low = sum(m < ze for m in missing)
            if b.completion_atoms(i, low, n_rest - low) <= atoms_left:
                return True
        return False

    def value_bounds(self, token_id: int) -> tuple[float, float]:
        """Closed interval the sampler keeps the value of `token_id` (the next token) in. Lengths are
        only required to be positive; angles stay within ANGLE_BOUNDS, and the third triclinic angle
        also within the triangle inequalities of the first two (with a margin), so the cell exists."""
        tok = self._tok[token_id]
        if tok in COORD_TOKENS:
            return 0.0, 1.0
        if tok not in ANGLE_TOKENS:
            return LENGTH_MIN, math.inf
        lo, hi = ANGLE_BOUNDS
        if tok == "gamma" and "alpha" in self.lattice and "beta" in self.lattice:
            a, b = self.lattice["alpha"], self.lattice["beta"]
            lo = max(lo, abs(a - b) + ANGLE_MARGIN)
            hi = min(hi, a + b - ANGLE_MARGIN, 360.0 - a - b - ANGLE_MARGIN)
        return lo, hi

    def _expect(self, ok: bool, message: str) -> None:
        if not ok:
            raise DecodeError(message)

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    def description(self) -> WyckoffDescription:
        if not self.done:
            raise DecodeError(f"sequence ends early (while expecting {self.phase.value.replace('_', ' ')})")
        return WyckoffDescription(self.stability, self.elements, self.group, self.sites, self.lattice)


def _handlers(cls: type, prefix: str) -> dict[Phase, Callable]:
    """{phase: cls.<prefix><phase value>} for every Phase; TypeError naming any that is missing."""
    missing = [prefix + p.value for p in Phase if not callable(getattr(cls, prefix + p.value, None))]
    if missing:
        raise TypeError(f"{cls.__name__} has no handler {', '.join(missing)}")
    return {p: getattr(cls, prefix + p.value) for p in Phase}


SequenceParser._FEEDERS = _handlers(SequenceParser, "_feed_")
SequenceParser._MASKS = _handlers(SequenceParser, "_mask_")


def parse(vocab: Vocab, ids, values) -> WyckoffDescription:
    """Validate a whole sequence and return what it describes (DecodeError if invalid)."""
    parser = SequenceParser(vocab)
    ids = np.asarray(ids)
    values = np.asarray(values, dtype=float)
    if ids.ndim != 1 or values.shape != ids.shape:
        raise DecodeError(f"ids and values must be 1-D and of equal length (got {ids.shape} and {values.shape})")
    for i, v in zip(ids.tolist(), values.tolist()):
        parser.feed(int(i), v)
    return parser.description()
