"""Sample-set metrics: the validity chain, uniqueness, novelty against a reference set of crystals,
and distribution statistics against that reference. The one implementation behind
`benchmarks/quality.py` and temperature sweeps (`wyckoffgpt.sweep`).

For a list of generated samples (`GeneratedCrystal`), `sample_set_metrics` counts:
  decoded         the sequence decodes to a structure
  dist_valid_0.5  decoded, and no two atoms closer than 0.5 Å (the CDVAE-style structural validity)
  valid           decoded, and no two atoms closer than the run's distance threshold (0.7 Å by
                  default; the generator's `distance_valid`)
  sg_consistent   valid, and spglib finds the space group the sequence states
  smact_valid     decoded, and the composition passes SMACT (`chemistry.smact_valid`)
  unique          valid, and matches no earlier valid sample
  novel           valid, and matches no crystal of the reference set
  unique_novel    both
decoded, dist_valid_0.5, valid and smact_valid are fractions of all samples; sg_consistent, unique,
novel and unique_novel fractions of the valid samples. Structures are compared with pymatgen's
StructureMatcher (default tolerances), only within the same reduced formula. Distribution
statistics are of the valid samples against the reference: the Wasserstein (earth mover's) distance
of the mass density (g/cm³) and of the number of elements, as CDVAE and DiffCSP report them, and the
share of samples per crystal system (from the space group spglib finds) with its total-variation
distance to the reference's shares.

The reference (`ReferenceSet`) is the model's own fingerprint index of its training crystals by
default (`model_reference`), or any set given with `load_reference`: a fingerprint index file, a
model folder, a prepared dataset folder (its train split) or structure files (a CSV with a `cif`
column, a folder of .cif files, an extxyz file).
"""
from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pymatgen.core import Structure

from .chemistry import smact_valid
from .decode import detected_spacegroup, find_duplicates_pairwise
from .descriptions import CRYSTAL_SYSTEMS, crystal_system, description_density
from .fingerprints import INDEX_FILE, FingerprintIndex, build_fingerprint_index
from .grammar import parse

if TYPE_CHECKING:
    from .generation import GeneratedCrystal

CDVAE_MIN_DISTANCE = 0.5  # Å; the structural-validity threshold of CDVAE-style benchmarks


# -- flags over a list of structures ---------------------------------------------------------------

def unique_flags(structures: Sequence[Structure]) -> list[bool]:
    """True for each structure that matches no earlier one (the first of each group of duplicates).
    Pairwise StructureMatcher, not the canonical forms of `wyckoffgpt.duplicates`: a metric must also
    hold for structures that are not generated (a jittered copy falls to lower symmetry, another key)."""
    return [match is None for match in find_duplicates_pairwise(list(structures))]


def novel_flags(structures: Sequence[Structure], reference: ReferenceSet | FingerprintIndex) -> list[bool]:
    """True for each structure that matches no crystal of the reference."""
    return [reference.find_match(s) is None for s in structures]


def low_prototype_flags(keys: Sequence[str | None], index: FingerprintIndex) -> list[bool]:
    """True for each prototype key that occurs among the index's low-e_hull training crystals."""
    known = index.low_prototypes
    return [k is not None and k in known for k in keys]


def fraction(flags: Sequence[bool]) -> float | None:
    """Mean of booleans; None for an empty list (a rate of nothing is undefined, not 0)."""
    return sum(map(bool, flags)) / len(flags) if flags else None


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (95 % for z = 1.96); it stays inside [0, 1] and
    is usable at k = 0 or k = n, where the normal approximation collapses to a point."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# -- reference sets --------------------------------------------------------------------------------

class _StructureGroups:
    """Structures grouped by reduced formula, matched with StructureMatcher within a group."""

    def __init__(self, structures: dict[str, Structure]):
        self.groups: dict[str, list[tuple[str, Structure]]] = defaultdict(list)
        for key, s in structures.items():
            self.groups[s.composition.reduced_formula].append((key, s))
        self._matcher = None

    def find_match(self, structure: Structure) -> str | None:
        if self._matcher is None:
            from pymatgen.analysis.structure_matcher import StructureMatcher

            self._matcher = StructureMatcher()
        for key, s in self.groups.get(structure.composition.reduced_formula, ()):
            if self._matcher.fit(s, structure):
                return key
        return None


@dataclass
class ReferenceSet:
    """Crystals that samples are compared with: `find_match` for novelty, and per crystal its mass
    density (g/cm³), number of elements and crystal system for the distribution statistics."""

    name: str
    find_match: Callable[[Structure], str | None]
    densities: np.ndarray
    element_counts: np.ndarray
    crystal_systems: list[str]

    def __len__(self) -> int:
        return len(self.densities)

    def crystal_system_shares(self) -> dict[str, float]:
        return _shares(self.crystal_systems)

    @classmethod
    def from_index(cls, index: FingerprintIndex, name: str) -> ReferenceSet:
        """The training crystals of a fingerprint index, read from their sequences (no decoding)."""
        densities, counts, systems = [], [], []
        for i in range(len(index)):
            lo, hi = index.offsets[i], index.offsets[i + 1]
            desc = parse(index.vocab, index.ids[lo:hi].astype(np.int64), index.values[lo:hi].astype(np.float64))
            densities.append(description_density(desc))
            counts.append(len(desc.elements))
            systems.append(desc.group.crystal_system)
        return cls(name, index.find_match, np.array(densities), np.array(counts), systems)

    @classmethod
    def from_structures(cls, structures: dict[str, Structure], name: str) -> ReferenceSet:
        """Any structures, keyed by an id that `find_match` returns."""
        systems = []
        for s in structures.values():
            sg = detected_spacegroup(s)
            systems.append(crystal_system(sg) if sg is not None else "unknown")
        values = list(structures.values())
        return cls(name, _StructureGroups(structures).find_match, np.array([s.density for s in values]),
                   np.array([len(s.composition.elements) for s in values]), systems)


def model_reference(model_dir: str | os.PathLike) -> ReferenceSet | None:
    """The model's own fingerprint index of its training crystals; None when the folder has none."""
    path = Path(model_dir) / INDEX_FILE
    if not path.is_file():
        return None
    index = FingerprintIndex.load(path)
    return ReferenceSet.from_index(index, f"the model's training crystals ({len(index)} crystals, "
                                          f"{path.parent.name}/{INDEX_FILE})")


def load_reference(path: str | os.PathLike) -> ReferenceSet:
    """A reference set from a fingerprint index file, a model folder with one, a prepared dataset
    folder (meta.json; its train split) or structure files (CSV with a `cif` column, folder of .cif
    files, extxyz). ValueError with a one-line reason when it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"reference {path} does not exist")
    if path.is_file() and path.suffix == ".npz" or path.is_dir() and (path / INDEX_FILE).is_file():
        index = FingerprintIndex.load(path)
        return ReferenceSet.from_index(index, f"fingerprint index {path} ({len(index)} crystals)")
    if path.is_dir() and (path / "meta.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            index = FingerprintIndex.load(build_fingerprint_index(path, Path(tmp) / INDEX_FILE))
        return ReferenceSet.from_index(index, f"dataset {path} (train split, {len(index)} crystals)")
    return _reference_from_files(path)


def _reference_from_files(path: Path) -> ReferenceSet:
    from .structure_io import InputError, iter_records, parse_structure

    structures: dict[str, Structure] = {}
    skipped = 0
    try:
        for rec in iter_records(path):
            try:
                structures[rec.key] = parse_structure(rec)
            except ValueError:
                skipped += 1
    except InputError as e:
        raise ValueError(f"reference {path}: {e}") from None
    if not structures:
        raise ValueError(f"reference {path} holds no readable structure")
    note = f", {skipped} unreadable skipped" if skipped else ""
    return ReferenceSet.from_structures(structures, f"{path} ({len(structures)} structures{note})")


# -- the metrics of one sample set -----------------------------------------------------------------

def _shares(systems: Sequence[str]) -> dict[str, float]:
    n = len(systems)
    return {s: (sum(x == s for x in systems) / n if n else 0.0) for s in CRYSTAL_SYSTEMS}


def _wasserstein(samples: Sequence[float], reference: np.ndarray) -> float | None:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(samples, reference)) if len(samples) and len(reference) else None


def _system_of(r: GeneratedCrystal) -> str:
    sg = r.detected_spacegroup if r.detected_spacegroup is not None else r.spacegroup
    return crystal_system(sg) if sg is not None else "unknown"


@dataclass
class SampleSetMetrics:
    """Counts of one sample set (see the module docstring), the distribution statistics, and per
    valid sample whether it is unique and novel (`valid_index` gives its position in the results)."""

    n: int
    decoded: int
    dist_valid_05: int
    valid: int
    sg_consistent: int
    smact_valid: int
    unique: int
    novel: int | None
    unique_novel: int | None
    wasserstein_density: float | None
    wasserstein_n_elements: float | None
    crystal_systems: dict[str, float | None]
    crystal_system_tvd: float | None
    reference: str | None
    valid_index: list[int] = field(default_factory=list)
    unique_flags: list[bool] = field(default_factory=list)
    novel_flags: list[bool] | None = None

    def row(self) -> dict[str, Any]:
        """Fractions (0-1) and counts, one flat dict: a row of a table."""
        of_n = lambda k: k / self.n if self.n else None  # noqa: E731
        of_valid = lambda k: None if k is None or not self.valid else k / self.valid  # noqa: E731
        out: dict[str, Any] = {"n": self.n}
        for name, count, rate in (("valid", self.valid, of_n), ("unique", self.unique, of_valid),
                                  ("novel", self.novel, of_valid), ("unique_novel", self.unique_novel, of_valid),
                                  ("decoded", self.decoded, of_n), ("dist_valid_0.5", self.dist_valid_05, of_n),
                                  ("sg_consistent", self.sg_consistent, of_valid),
                                  ("smact_valid", self.smact_valid, of_n)):
            out[name] = rate(count)
            out[f"n_{name}"] = count
        out["wasserstein_density"] = self.wasserstein_density
        out["wasserstein_n_elements"] = self.wasserstein_n_elements
        out.update({f"share_{s}": v for s, v in self.crystal_systems.items()})
        out["crystal_system_tvd"] = self.crystal_system_tvd
        out["reference"] = self.reference
        return out


def sample_set_metrics(results: Sequence[GeneratedCrystal], reference: ReferenceSet | None) -> SampleSetMetrics:
    """The metrics of a sample set against `reference` (None: novelty and the distribution
    distances are left out)."""
    decoded = [r for r in results if r.structure is not None]
    valid_index = [k for k, r in enumerate(results) if r.distance_valid]
    valid = [results[k] for k in valid_index]
    structures = [r.structure for r in valid]
    unique = unique_flags(structures)
    novel = novel_flags(structures, reference) if reference is not None else None
    systems = [_system_of(r) for r in valid]
    shares = _shares(systems) if valid else dict.fromkeys(CRYSTAL_SYSTEMS)  # no samples, no shares
    densities = [s.density for s in structures]
    counts = [len(s.composition.elements) for s in structures]
    tvd = None
    if reference is not None and valid:
        ref = reference.crystal_system_shares()
        tvd = 0.5 * sum(abs(shares[s] - ref[s]) for s in CRYSTAL_SYSTEMS)
    return SampleSetMetrics(
        n=len(results), decoded=len(decoded),
        dist_valid_05=sum(r.min_distance is not None and r.min_distance >= CDVAE_MIN_DISTANCE for r in decoded),
        valid=len(valid), sg_consistent=sum("spacegroup_mismatch" not in r.flags for r in valid),
        smact_valid=sum(smact_valid(r.structure.composition) for r in decoded),
        unique=sum(unique), novel=None if novel is None else sum(novel),
        unique_novel=None if novel is None else sum(u and v for u, v in zip(unique, novel)),
        wasserstein_density=_wasserstein(densities, reference.densities) if reference is not None else None,
        wasserstein_n_elements=_wasserstein(counts, reference.element_counts) if reference is not None else None,
        crystal_systems=shares, crystal_system_tvd=tvd, reference=reference.name if reference is not None else None,
        valid_index=valid_index, unique_flags=unique, novel_flags=novel)
