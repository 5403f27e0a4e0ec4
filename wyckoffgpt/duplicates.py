"""Duplicate crystals found from their canonical Wyckoff descriptions, in time linear in their number.

Equal crystals have equal canonical descriptions (`symmetry.describe_structure`, the tokenizer's
encoding): the same space group, the same Wyckoff positions holding the same elements, free values
equal within tolerance. A crystal's *key*, its space group and the (position, element) of each
site, therefore sorts it into a bucket, and it is compared only with the members of that bucket.
The comparison applies StructureMatcher's default tolerances to the two descriptions directly:
both cells scaled to the same volume (`scale=True`), lattice lengths within `ltol` (fractional) and
angles within `angle_tol` (of the Niggli-reduced primitive cells, as StructureMatcher compares
them), and every atom, after removing the mean shift, within `stol` times
(volume per atom)^(1/3) of its partner, the nearest atom of its element.

What it cannot see: two crystals StructureMatcher matches although their keys differ (a slightly
distorted copy of a higher-symmetry crystal, whose space group spglib finds lower at the
tokenizer's `symprec`). `benchmarks/duplicates.py` measures how often the two answers differ.
A structure spglib cannot describe at all falls back to StructureMatcher among such structures.

    index = DuplicateIndex()
    for label, structure in enumerate(structures):
        match = index.add(structure, label)   # label of an earlier equal crystal, or None
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import combinations

import numpy as np
from pymatgen.core import Composition, Lattice, Structure
from scipy.optimize import linear_sum_assignment

from .decode import DEFAULT_SYMPREC, expand_orbits, lattice_from_free
from .grammar import WyckoffDescription
from .symmetry import EncodeError, describe_structure
from .vocab import Vocab, default_vocab

_CHUNK = 16  # members compared at once: bounds the (members, atoms, atoms, 3) array
Key = tuple  # (space group number, ((position index, element), ...))


@cache
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
    species: np.ndarray  # (atoms,) element symbols
    formula: str  # reduced formula
    _reduced: Lattice | None = field(default=None, repr=False)

    @property
    def primitive_centering(self) -> range:
        """One entry per lattice point of the conventional cell."""
        return range(round(1 / abs(np.linalg.det(self.primitive))))

    @property
    def shape(self) -> np.ndarray:
        """(6,): lengths and angles (degrees) of the unit-volume conventional cell."""
        lengths = np.linalg.norm(self.lattice, axis=1)
        cos = [self.lattice[1] @ self.lattice[2], self.lattice[0] @ self.lattice[2], self.lattice[0] @ self.lattice[1]]
        pairs = [lengths[1] * lengths[2], lengths[0] * lengths[2], lengths[0] * lengths[1]]
        return np.concatenate([lengths, np.degrees(np.arccos(np.clip(np.divide(cos, pairs), -1, 1)))])

    @property
    def reduced(self) -> Lattice:
        """The Niggli-reduced primitive cell (at the unit-volume scale); computed once, when needed."""
        if self._reduced is None:
            self._reduced = Lattice(self.primitive @ self.lattice).get_niggli_reduced_lattice()
        return self._reduced


def description_form(desc: WyckoffDescription) -> CanonicalForm:
    """The form of a canonical description (an encoded crystal or a training sequence)."""
    key = (desc.group.number, tuple((s.position.index, s.element) for s in desc.sites))
    lattice = lattice_from_free(desc.group.crystal_system, desc.lattice)
    species, coords = expand_orbits(desc.group, desc.sites)
    primitive = _primitive_basis(tuple(map(tuple, desc.group.centering.tolist())))
    return CanonicalForm(key, lattice.matrix * lattice.volume ** (-1 / 3), primitive, coords, np.array(species),
                         Composition(Counter(species)).reduced_formula)


def canonical_form(structure: Structure, vocab: Vocab | None = None, symprec: float = DEFAULT_SYMPREC,
                   known_dataset=None) -> CanonicalForm | None:
    """The form of a structure's canonical description; None when spglib cannot describe it.
    `known_dataset`: spglib's dataset of the structure at `symprec`, if already computed."""
    vocab = vocab or default_vocab()
    try:
        table, sites, lattice = describe_structure(structure, vocab, symprec, known_dataset)
    except EncodeError:
        return None
    return description_form(WyckoffDescription("ehull:unknown", [], table, sites, lattice))


class _Bucket:
    """The representatives of one key, in arrays that grow by doubling (appends stay amortized O(1))."""

    def __init__(self, form: CanonicalForm):
        self.size = 0
        self.labels: list[Hashable] = []
        # One slot to start with: most keys never hold a second crystal, and a run's index holds
        # thousands of keys.
        self.reduced = np.empty((1, 3, 3))  # Niggli-reduced primitive cells, as arrays (a Lattice weighs ~1 kB)
        self.lattice = np.empty((1, 3, 3))
        self.shape = np.empty((1, 6))
        self.coords = np.empty((1,) + form.coords.shape)
        # Atoms that may be partners: same element (one key, so one species list for all members).
        self.other_species = form.species[:, None] != form.species[None, :]

    def append(self, form: CanonicalForm, label: Hashable) -> None:
        if self.size == len(self.lattice):
            for name in ("lattice", "shape", "coords", "reduced"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.empty_like(old)]))
        k = self.size
        self.lattice[k], self.shape[k], self.coords[k] = form.lattice, form.shape, form.coords
        self.labels.append(label)
        self.reduced[k] = form.reduced.matrix
        self.size += 1

    def first_match(self, form: CanonicalForm, tol: MatchTolerances) -> Hashable | None:
        k = self.size
        # A coarse screen on the conventional cells (twice the tolerances: StructureMatcher compares
        # reduced primitive cells, whose lengths and angles differ from these) ...
        ratio = self.shape[:k, :3] / form.shape[:3]
        ok = np.all((ratio < (1 + tol.ltol) ** 2) & (ratio > (1 + tol.ltol) ** -2), axis=1)
        ok &= np.all(np.abs(self.shape[:k, 3:] - form.shape[3:]) <= 2 * tol.angle_tol, axis=1)
        candidates = np.flatnonzero(ok)
        for start in range(0, len(candidates), _CHUNK):
            chunk = candidates[start:start + _CHUNK]
            for m in chunk[self._site_distances(form, chunk) <= tol.stol]:
                # ... then StructureMatcher's own lattice test where the atoms agree: some basis of
                # one reduced cell within ltol (lengths) and angle_tol of the other's.
                if Lattice(self.reduced[m]).find_mapping(form.reduced, tol.ltol, tol.angle_tol,
                                                      skip_rotation_matrix=True) is not None:
                    return self.labels[int(m)]
        return None

    def _site_distances(self, form: CanonicalForm, members: np.ndarray) -> np.ndarray:
        """Per member: the largest distance of an atom of `form` from its partner, in units of
        (volume per atom)^(1/3), after removing the mean shift (StructureMatcher's `max_dist`).

        One key fixes the atoms' order only up to the choice of each orbit's representative atom
        (which can flip between two nearly equal crystals when a value is near 0 or a tie), so each
        atom is paired with the nearest atom of its element; where that is not one-to-one, the
        pairing of least total squared distance is used, as StructureMatcher does."""
        avg = 0.5 * (self.lattice[members] + form.lattice)  # (m, 3, 3)
        # Volume per atom of the averaged cell: the unit of stol, as in StructureMatcher.
        unit = (np.abs(np.linalg.det(avg)) / len(form.coords)) ** (1 / 3)
        delta = form.coords[None, :, None, :] - self.coords[members][:, None, :, :]  # (m, atoms, atoms, 3)
        delta -= np.rint(delta)
        cart = np.einsum("mabi,mij->mabj", delta, avg)
        d2 = (cart ** 2).sum(axis=3)
        d2[:, self.other_species] = np.inf
        partner = d2.argmin(axis=2)  # (m, atoms)
        for m in np.flatnonzero((np.sort(partner, axis=1) != np.arange(partner.shape[1])).any(axis=1)):
            partner[m] = linear_sum_assignment(d2[m])[1]
        vecs = np.take_along_axis(cart, partner[:, :, None, None], axis=2)[:, :, 0, :]  # (m, atoms, 3)
        vecs -= vecs.mean(axis=1, keepdims=True)  # a common shift of all atoms is no difference
        return np.sqrt((vecs ** 2).sum(axis=2)).max(axis=1) / unit


class DuplicateIndex:
    """Crystals seen so far, one representative per group of equal ones; add to it one at a time.

    Only crystals of one reduced formula can be equal, so the canonical form (the one costly step,
    spglib and the normalizer search) of the first crystal of a formula waits until a second one
    arrives; an unconditional sample set, nearly all of distinct formulas, needs almost none."""

    def __init__(self, tolerances: MatchTolerances | None = None, vocab: Vocab | None = None,
                 symprec: float = DEFAULT_SYMPREC, across_keys: bool = True):
        self.tolerances = tolerances or MatchTolerances()
        self.across_keys = across_keys
        # formula -> [(label, key, atoms per primitive cell, sorted reduced lengths, reduced lattice, `_reduced_cell`)]
        self._by_formula: dict[str, list[tuple]] = {}
        self.vocab = vocab or default_vocab()
        self.symprec = symprec
        self._buckets: dict[Key, _Bucket] = {}
        self._unkeyed: dict[str, list[tuple[Hashable, Structure]]] = {}
        # formula -> (label, *_compact(structure)) of its only crystal so far, or None once a second has come
        self._alone: dict[str, tuple | None] = {}
        self._matcher = None

    def __len__(self) -> int:
        """Number of representatives (distinct crystals) held."""
        return (sum(b.size for b in self._buckets.values()) + sum(map(len, self._unkeyed.values()))
                + sum(v is not None for v in self._alone.values()))

    def form(self, structure: Structure, known_dataset=None) -> CanonicalForm | None:
        return canonical_form(structure, self.vocab, self.symprec, known_dataset)

    def find(self, structure: Structure, form: CanonicalForm | None = None) -> Hashable | None:
        """Label of a held crystal equal to `structure`, or None. `form`: its canonical form, if
        already computed (e.g. in another process)."""
        formula = structure.composition.reduced_formula
        if formula not in self._alone:
            return None
        self._settle(formula)
        return self._find(structure, form or self.form(structure))

    def _find(self, structure: Structure, form: CanonicalForm | None) -> Hashable | None:
        if form is None:
            return self._find_unkeyed(structure)
        bucket = self._buckets.get(form.key)
        match = None if bucket is None else bucket.first_match(form, self.tolerances)
        if match is None and self.across_keys:
            match = self._find_across_keys(structure, form)
        return match

    def add(self, structure: Structure, label: Hashable, form: CanonicalForm | None = None,
            known_dataset=None) -> Hashable | None:
        """Label of a held crystal equal to `structure`; when there is none, `structure` is added as
        a new representative under `label` and None is returned. `known_dataset`: spglib's dataset
        of `structure` at the index's symprec, if already computed (saves repeating that call)."""
        formula = structure.composition.reduced_formula
        if formula not in self._alone and form is None:
            self._alone[formula] = (label, *_compact(structure))
            return None
        self._settle(formula)
        form = form or self.form(structure, known_dataset)
        match = self._find(structure, form)
        if match is None:
            self._alone[formula] = None
            self._hold(structure, label, form)
        return match

    def _settle(self, formula: str) -> None:
        """Give the formula's waiting crystal its form and bucket."""
        alone = self._alone.get(formula)
        if alone is not None:
            self._alone[formula] = None
            structure = _restore(*alone[1:])
            self._hold(structure, alone[0], self.form(structure))

    def _hold(self, structure: Structure, label: Hashable, form: CanonicalForm | None) -> None:
        if form is None:
            self._unkeyed.setdefault(structure.composition.reduced_formula, []).append((label, structure))
            return
        self.add_form(form, label, structure)

    def _find_across_keys(self, structure: Structure, form: CanonicalForm) -> Hashable | None:
        """StructureMatcher against the held crystals of the formula under other keys whose reduced
        cells StructureMatcher's lattice test accepts (same number of atoms per primitive cell)."""
        held = self._by_formula.get(form.formula, [])
        if not held:
            return None
        # Niggli cells' lengths are the lattice's successive minima, so a basis of one within ltol of
        # the other's needs the sorted lengths within ltol too: a cheap screen before the lattice test.
        lengths = np.sort(form.reduced.abc)
        ratio = np.array([h[3] for h in held]) / lengths
        near = np.all((ratio < 1 + self.tolerances.ltol) & (ratio > 1 / (1 + self.tolerances.ltol)), axis=1)
        reduced_structure = None
        for k in np.flatnonzero(near):
            label, key, atoms, _, reduced, cell = held[k]
            if key == form.key or atoms != _primitive_atoms(form):
                continue
            if Lattice(reduced).find_mapping(form.reduced, self.tolerances.ltol, self.tolerances.angle_tol,
                                          skip_rotation_matrix=True) is None:
                continue
            # StructureMatcher compares Niggli-reduced primitive cells: built from the canonical forms
            # (the group's centering) instead of pymatgen's search for a primitive cell (~6 ms each).
            if reduced_structure is None:
                reduced_structure = _restore(*_reduced_cell(form, _scale(form, structure)))
            if self._structure_matcher().fit(_restore(*cell), reduced_structure, skip_structure_reduction=True):
                return label
        return None

    def _structure_matcher(self):
        if self._matcher is None:
            from pymatgen.analysis.structure_matcher import StructureMatcher

            t = self.tolerances
            self._matcher = StructureMatcher(ltol=t.ltol, stol=t.stol, angle_tol=t.angle_tol)
        return self._matcher

    def add_form(self, form: CanonicalForm, label: Hashable, structure: Structure | None = None) -> None:
        """Hold `form` as a representative under `label`, unchecked (e.g. a known-distinct set);
        with its `structure`, the comparison across keys sees it too."""
        self._settle(form.formula)
        self._alone[form.formula] = None
        if structure is not None and self.across_keys:
            self._by_formula.setdefault(form.formula, []).append(
                (label, form.key, _primitive_atoms(form), np.sort(form.reduced.abc), form.reduced.matrix,
                 _reduced_cell(form, _scale(form, structure))))
        bucket = self._buckets.get(form.key)
        if bucket is None:
            bucket = self._buckets[form.key] = _Bucket(form)
        bucket.append(form, label)

    def _find_unkeyed(self, structure: Structure) -> Hashable | None:
        # Only structures spglib cannot describe land here (overlapping atoms, mostly): rare
        # enough for pairwise StructureMatcher.
        for label, other in self._unkeyed.get(structure.composition.reduced_formula, []):
            if self._structure_matcher().fit(other, structure):
                return label
        return None


def _primitive_atoms(form: CanonicalForm) -> int:
    return len(form.coords) // len(form.primitive_centering)


def _compact(structure: Structure) -> tuple:
    """(lattice, atomic numbers, fractional coordinates): a tenth of a Structure's memory."""
    return (structure.lattice.matrix.copy(), np.array(structure.atomic_numbers, dtype=np.int16),
            structure.frac_coords.astype(np.float64, copy=True))


def _restore(lattice: np.ndarray, numbers: np.ndarray, coords: np.ndarray) -> Structure:
    return Structure(lattice, numbers.tolist(), coords)


def _scale(form: CanonicalForm, structure: Structure) -> float:
    """Length scale of `structure` relative to its form's unit-volume cell."""
    return (structure.volume * len(form.coords) / len(structure)) ** (1 / 3)


def _reduced_cell(form: CanonicalForm, scale: float) -> tuple:
    """The crystal as StructureMatcher compares it, its Niggli-reduced primitive cell at `scale`,
    compact (see `_compact`): the atoms of the conventional cell in the reduced basis, one of each set
    of centring copies."""
    reduced = form.reduced.matrix
    frac = (form.coords @ form.lattice) @ np.linalg.inv(reduced)
    frac -= np.floor(frac)
    # Centring copies land on one point of the primitive cell (up to rounding, and 0 ~ 1).
    _, first = np.unique(np.rint(frac * 1e4).astype(np.int64) % 10000, axis=0, return_index=True)
    first.sort()
    return reduced * scale, form.species[first], frac[first]


def find_duplicates(structures: Sequence[Structure | None], tolerances: MatchTolerances | None = None
                    ) -> list[int | None]:
    """For each structure, the index of an earlier structure it matches, or None (also for None
    entries): the same contract as `decode.find_duplicates_pairwise`, from canonical forms."""
    index = DuplicateIndex(tolerances)
    return [None if s is None else index.add(s, i) for i, s in enumerate(structures)]
