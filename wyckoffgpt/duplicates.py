"""Duplicate crystals found from their canonical Wyckoff descriptions, in time linear in their number.

Equal crystals have equal canonical descriptions (`symmetry.describe_structure`, the tokenizer's
encoding): the same space group, the same Wyckoff positions holding the same elements, free values
equal within tolerance. A crystal's *key*, its space group and the (position, element) of each
site, therefore sorts it into a bucket, and it is compared only with the members of that bucket.
The comparison applies StructureMatcher's default tolerances to the two descriptions directly:
both cells scaled to the same volume (`scale=True`), lattice lengths within `ltol` (fractional) and
angles within `angle_tol` (of the Niggli-reduced primitive cells, as StructureMatcher compares
them), and every atom, after removing the mean shift, within `stol` times
(volume per atom)^(1/3) of its partner. Partners need no search: two descriptions with one key
expand to their atoms in the same order (`decode.expand_orbits`).

What it cannot see: two crystals StructureMatcher matches although their keys differ (a slightly
distorted copy of a higher-symmetry crystal, whose space group spglib finds lower at the
tokenizer's `symprec`). `benchmarks/duplicates.py` measures how often the two answers differ.
A structure spglib cannot describe at all falls back to StructureMatcher among such structures.

    index = DuplicateIndex()
    for label, structure in enumerate(structures):
        match = index.add(structure, label)   # label of an earlier equal crystal, or None
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations

import numpy as np
from pymatgen.core import Lattice, Structure

from .decode import DEFAULT_SYMPREC, expand_orbits, lattice_from_free
from .grammar import WyckoffDescription
from .symmetry import EncodeError, describe_structure
from .vocab import Vocab, default_vocab

Key = tuple  # (space group number, ((position index, element), ...))


@lru_cache(maxsize=None)
def _primitive_basis(centering: tuple[tuple[float, ...], ...]) -> np.ndarray:
    """Rows: a primitive basis of the centred lattice, in conventional fractional coordinates."""
    vectors = [np.eye(3)[i] for i in range(3)] + [np.array(t) for t in centering if any(t)]
    target = 1 / len(centering)
    for rows in combinations(vectors, 3):
        basis = np.array(rows)
        if abs(abs(np.linalg.det(basis)) - target) < 1e-6:
            return basis
    raise ValueError(f"no primitive basis among the centering vectors {centering}")


@dataclass(frozen=True)
class MatchTolerances:
    """When two crystals count as one; the defaults are pymatgen StructureMatcher's."""

    ltol: float = 0.2  # lattice lengths, fractional, after scaling both cells to one volume
    stol: float = 0.3  # atom displacement, in units of (volume per atom)^(1/3)
    angle_tol: float = 5.0  # lattice angles, degrees

    def __post_init__(self) -> None:
        if not (self.ltol >= 0 and self.stol >= 0 and self.angle_tol >= 0):
            raise ValueError(f"tolerances must be >= 0, got {self}")


@dataclass
class CanonicalForm:
    """What the comparison needs of one crystal: its key, its conventional cell scaled to unit
    volume (rows are the lattice vectors), the lengths and angles of its Niggli-reduced primitive
    cell at that scale (what StructureMatcher compares), and its atoms' fractional coordinates in
    the order its canonical description expands them."""

    key: Key
    lattice: np.ndarray  # (3, 3)
    primitive: np.ndarray  # (3, 3) rows: a primitive basis in conventional fractional coordinates
    coords: np.ndarray  # (atoms, 3)
    _reduced: np.ndarray | None = field(default=None, repr=False)

    @property
    def reduced(self) -> np.ndarray:
        """(6,): lengths and angles (degrees) of the Niggli-reduced primitive cell; computed once,
        when first compared."""
        if self._reduced is None:
            lattice = Lattice(self.primitive @ self.lattice).get_niggli_reduced_lattice()
            self._reduced = np.array(lattice.parameters)
        return self._reduced


def description_form(desc: WyckoffDescription) -> CanonicalForm:
    """The form of a canonical description (an encoded crystal or a training sequence)."""
    key = (desc.group.number, tuple((s.position.index, s.element) for s in desc.sites))
    lattice = lattice_from_free(desc.group.crystal_system, desc.lattice)
    _, coords = expand_orbits(desc.group, desc.sites)
    primitive = _primitive_basis(tuple(map(tuple, desc.group.centering.tolist())))
    return CanonicalForm(key, lattice.matrix * lattice.volume ** (-1 / 3), primitive, coords)


def canonical_form(structure: Structure, vocab: Vocab | None = None,
                   symprec: float = DEFAULT_SYMPREC) -> CanonicalForm | None:
    """The form of a structure's canonical description; None when spglib cannot describe it."""
    vocab = vocab or default_vocab()
    try:
        table, sites, lattice = describe_structure(structure, vocab, symprec)
    except EncodeError:
        return None
    return description_form(WyckoffDescription("ehull:unknown", [], table, sites, lattice))


class _Bucket:
    """The representatives of one key, in arrays that grow by doubling (appends stay amortized O(1))."""

    def __init__(self, form: CanonicalForm):
        self.size = 0
        self.labels: list[Hashable] = []
        self.lattice = np.empty((4, 3, 3))
        self.reduced = np.empty((4, 6))
        self.coords = np.empty((4,) + form.coords.shape)

    def append(self, form: CanonicalForm, label: Hashable) -> None:
        if self.size == len(self.lattice):
            for name in ("lattice", "reduced", "coords"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.empty_like(old)]))
        k = self.size
        self.lattice[k], self.reduced[k], self.coords[k] = form.lattice, form.reduced, form.coords
        self.labels.append(label)
        self.size += 1

    def first_match(self, form: CanonicalForm, tol: MatchTolerances) -> Hashable | None:
        k = self.size
        ratio = self.reduced[:k, :3] / form.reduced[:3]
        # StructureMatcher's test: each length within a factor 1 + ltol, each angle within angle_tol.
        ok = np.all((ratio < 1 + tol.ltol) & (ratio > 1 / (1 + tol.ltol)), axis=1)
        ok &= np.all(np.abs(self.reduced[:k, 3:] - form.reduced[3:]) <= tol.angle_tol, axis=1)
        candidates = np.flatnonzero(ok)
        if not len(candidates):
            return None
        avg = 0.5 * (self.lattice[candidates] + form.lattice)  # (c, 3, 3)
        # Per atom volume of the averaged cell: the unit of stol, as in StructureMatcher.
        unit = (np.abs(np.linalg.det(avg)) / len(form.coords)) ** (1 / 3)
        delta = form.coords - self.coords[candidates]
        delta -= np.rint(delta)
        cart = np.einsum("cai,cij->caj", delta, avg)
        cart -= cart.mean(axis=1, keepdims=True)  # a common shift of all atoms is no difference
        worst = np.sqrt((cart ** 2).sum(axis=2)).max(axis=1) / unit
        hits = candidates[worst <= tol.stol]
        return self.labels[int(hits[0])] if len(hits) else None


class DuplicateIndex:
    """Crystals seen so far, one representative per group of equal ones; add to it one at a time."""

    def __init__(self, tolerances: MatchTolerances | None = None, vocab: Vocab | None = None,
                 symprec: float = DEFAULT_SYMPREC):
        self.tolerances = tolerances or MatchTolerances()
        self.vocab = vocab or default_vocab()
        self.symprec = symprec
        self._buckets: dict[Key, _Bucket] = {}
        self._unkeyed: dict[str, list[tuple[Hashable, Structure]]] = {}
        self._matcher = None

    def __len__(self) -> int:
        """Number of representatives (distinct crystals) held."""
        return sum(b.size for b in self._buckets.values()) + sum(map(len, self._unkeyed.values()))

    def form(self, structure: Structure) -> CanonicalForm | None:
        return canonical_form(structure, self.vocab, self.symprec)

    def find(self, structure: Structure, form: CanonicalForm | None = None) -> Hashable | None:
        """Label of a held crystal equal to `structure`, or None. `form`: its canonical form, if
        already computed (e.g. in another process)."""
        form = form or self.form(structure)
        if form is None:
            return self._find_unkeyed(structure)
        bucket = self._buckets.get(form.key)
        return None if bucket is None else bucket.first_match(form, self.tolerances)

    def add(self, structure: Structure, label: Hashable, form: CanonicalForm | None = None) -> Hashable | None:
        """Label of a held crystal equal to `structure`; when there is none, `structure` is added as
        a new representative under `label` and None is returned."""
        form = form or self.form(structure)
        match = self.find(structure, form)
        if match is None:
            if form is None:
                self._unkeyed.setdefault(structure.composition.reduced_formula, []).append((label, structure))
            else:
                self.add_form(form, label)
        return match

    def add_form(self, form: CanonicalForm, label: Hashable) -> None:
        """Hold `form` as a representative under `label`, unchecked (e.g. a known-distinct set)."""
        bucket = self._buckets.get(form.key)
        if bucket is None:
            bucket = self._buckets[form.key] = _Bucket(form)
        bucket.append(form, label)

    def _find_unkeyed(self, structure: Structure) -> Hashable | None:
        # Only structures spglib cannot describe land here (overlapping atoms, mostly): rare
        # enough for pairwise StructureMatcher.
        if self._matcher is None:
            from pymatgen.analysis.structure_matcher import StructureMatcher

            self._matcher = StructureMatcher()
        for label, other in self._unkeyed.get(structure.composition.reduced_formula, []):
            if self._matcher.fit(other, structure):
                return label
        return None


def find_duplicates(structures: Sequence[Structure | None], tolerances: MatchTolerances | None = None
                    ) -> list[int | None]:
    """For each structure, the index of an earlier structure it matches, or None (also for None
    entries): the same contract as `decode.find_duplicates`, from canonical forms."""
    index = DuplicateIndex(tolerances)
    return [None if s is None else index.add(s, i) for i, s in enumerate(structures)]
