"""Wyckoff description -> pymatgen Structure, and the sanity filters applied to decoded crystals.

Orbit expansion is vectorized numpy over the tabulated operations (one op per centering
coset, centering added by broadcasting): no per-atom Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Lattice, Structure

from .grammar import DecodeError, Site, WyckoffDescription
from .vocab import SpaceGroupTable

MAX_ATOMS = 2000  # a bound for arbitrary input, far above any crystal in the training data


def lattice_from_free(crystal_system: str, free: dict[str, float]) -> Lattice:
    a = free["a"]
    b = free.get("b", a)
    c = free.get("c", a)
    alpha = free.get("alpha", 90.0)
    beta = free.get("beta", 90.0)
    gamma = free.get("gamma", 120.0 if crystal_system in ("trigonal", "hexagonal") else 90.0)
    cos = np.cos(np.radians([alpha, beta, gamma]))
    # Volume factor of a triclinic cell; <= 0 means the three angles cannot close a cell.
    vol2 = 1 - (cos**2).sum() + 2 * cos.prod()
    if not vol2 > 1e-8:
        raise DecodeError(f"angles alpha={alpha:.4g}, beta={beta:.4g}, gamma={gamma:.4g} do not form a cell")
    return Lattice.from_parameters(a, b, c, alpha, beta, gamma)


def expand_orbits(group: SpaceGroupTable, sites: list[Site]) -> tuple[list[str], np.ndarray]:
    """Species and fractional coordinates of every atom in the conventional cell."""
    n_atoms = sum(s.position.multiplicity for s in sites)
    if n_atoms > MAX_ATOMS:
        raise DecodeError(f"{n_atoms} atoms in the cell, more than the limit of {MAX_ATOMS}")
    centering = group.centering
    species: list[str] = []
    blocks = []
    for site in sites:
        pos = site.position
        v = np.zeros(3)
        v[pos.free_axes] = site.free_values
        orbit = pos.rotations @ v + pos.translations  # (n_ops, 3)
        blocks.append((orbit[None, :, :] + centering[:, None, :]).reshape(-1, 3))
        species.extend([site.element] * pos.multiplicity)
    return species, np.concatenate(blocks) % 1.0


SEPARABLE = {"cubic": "a", "tetragonal": "c", "trigonal": "c", "hexagonal": "c", "orthorhombic": "c"}


def separating_length(group: SpaceGroupTable, sites: list[Site], lattice: dict[str, float], name: str,
                      threshold: float) -> float | None:
    """The value of the last free lattice length `name` (given in `lattice`, with the others) if no
    two atoms are closer than `threshold` Å there; otherwise the smallest value at which none are;
    None when no value can separate them.

    Only for cells where raising that length can only move atoms apart: `a` of a cubic cell (all
    distances scale with it) and `c` of an orthogonal c axis (tetragonal, trigonal, hexagonal,
    orthorhombic), where a pair's distance is sqrt(in-plane² + (dz·c)²)."""
    species, coords = expand_orbits(group, sites)
    system = group.crystal_system

    def dist(value: float) -> float:
        cell = lattice_from_free(system, {**lattice, name: value})
        return cell_min_distance(cell, cell.get_cartesian_coords(coords))

    if dist(lattice[name]) >= threshold:
        return lattice[name]

    if system == "cubic":
        d1 = dist(1.0)
        return threshold / d1 if d1 > 0 else None
    # With c huge only in-plane contacts remain; they do not depend on c.
    if dist(1e4) < threshold:
        return None
    dz = np.abs(coords[:, None, 2] - coords[None, :, 2]) % 1.0
    dz = np.minimum(dz, 1.0 - dz)
    dz = dz[dz > 1e-9]
    # Every pair at a different height is at least dz·c apart: this c certainly separates them all.
    lo, hi = 0.0, max(threshold / (dz.min() if len(dz) else 1.0), threshold)
    for _ in range(12):  # bracket to 1/4096 of its width; hi stays on the separating side
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if dist(mid) >= threshold else (mid, hi)
    return hi


def to_structure(desc: WyckoffDescription) -> Structure:
    lattice = lattice_from_free(desc.group.crystal_system, desc.lattice)
    species, coords = expand_orbits(desc.group, desc.sites)
    return Structure(lattice, species, coords)


def description_cell(desc: WyckoffDescription) -> tuple[Lattice, np.ndarray]:
    """The cell and the atoms' Cartesian coordinates (Å) of a description: what the distance checks
    need, without building a Structure (hundreds of site objects) on the sampler's hot path."""
    lattice = lattice_from_free(desc.group.crystal_system, desc.lattice)
    _, coords = expand_orbits(desc.group, desc.sites)
    return lattice, lattice.get_cartesian_coords(coords)


# -- filters ---------------------------------------------------------------------------------------

DEFAULT_MIN_DISTANCE = 0.7  # Å; closer atoms mark a physically implausible structure
DEFAULT_SYMPREC = 0.01  # Å; the same tolerance the tokenizer encodes with


def shortest_lattice_vector(lattice: Lattice) -> float:
    """Length of the shortest nonzero lattice vector: the distance from any atom to its own image."""
    basis = lattice.get_lll_reduced_lattice().matrix
    # In 3-D, the shortest vector of an LLL-reduced basis is among its small combinations.
    coeffs = np.array(np.meshgrid(*[(-1, 0, 1)] * 3, indexing="ij")).reshape(3, -1).T
    coeffs = coeffs[np.any(coeffs != 0, axis=1)]
    return float(np.linalg.norm(coeffs @ basis, axis=1).min())


def _neighbours(lattice: Lattice, cart: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centers, points, distances) of all atom pairs within `radius` Å, periodic images included;
    an atom's own zero-offset copy is left out, distinct atoms on the same point are kept."""
    from pymatgen.optimization.neighbors import find_points_in_spheres

    # Cartesian positions are basis-independent: search in the LLL-reduced cell, whose near-orthogonal
    # basis keeps the image search small.
    lll = np.ascontiguousarray(lattice.get_lll_reduced_lattice().matrix, dtype=float)
    cart = np.ascontiguousarray(cart, dtype=float)
    centers, points, offsets, dists = find_points_in_spheres(
        cart, cart, r=radius, pbc=np.array([1, 1, 1], dtype=np.int64), lattice=lll, tol=1e-8)
    keep = (centers != points) | np.any(offsets != 0, axis=1)
    return centers[keep], points[keep], dists[keep]


def min_distance(structure: Structure) -> float:
    """Smallest interatomic distance in Å over all periodic images, an atom's own images included
    (so a lone atom gives the shortest lattice vector); 0 for two atoms at the same point."""
    return cell_min_distance(structure.lattice, structure.cart_coords)


def cell_min_distance(lattice: Lattice, cart: np.ndarray) -> float:
    """`min_distance` of atoms at Cartesian coordinates `cart` (Å) in `lattice`."""
    self_image = shortest_lattice_vector(lattice)
    if len(cart) == 1:
        return self_image
    # Search no farther than the own-image distance: the answer is at most that, and the radius
    # bounds the neighbour count even for flat or needle-like cells.
    _, _, dists = _neighbours(lattice, cart, self_image * (1 + 1e-9) + 1e-9)
    return float(min(dists.min(initial=self_image), self_image))


def close_pairs(structure: Structure | tuple[Lattice, np.ndarray], threshold: float) -> np.ndarray:
    """(k, 2) sorted index pairs (i <= j) of atoms closer than `threshold` Å, periodic images
    included; (i, i) means atom i is that close to its own image. `structure`: a Structure, or its
    lattice and Cartesian coordinates (`description_cell`)."""
    lattice, cart = (structure.lattice, structure.cart_coords) if isinstance(structure, Structure) else structure
    if shortest_lattice_vector(lattice) < threshold:
        # Every atom clashes with its own image, and a sphere search in such a cell could return an
        # unbounded number of images.
        return np.repeat(np.arange(len(cart))[:, None], 2, axis=1)
    centers, points, dists = _neighbours(lattice, cart, threshold)
    close = dists < threshold
    pairs = np.sort(np.stack([centers[close], points[close]], axis=1), axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def detected_spacegroup(structure: Structure, symprec: float = DEFAULT_SYMPREC) -> int | None:
    """International number spglib finds, or None when it finds none."""
    data = _symmetry_dataset(structure, symprec)
    return int(data.number) if data is not None else None


def spglib_cell(structure: Structure) -> tuple:
    """The (lattice, fractional coordinates, atomic numbers) cell spglib reads. One builder for the
    filter and the tokenizer (`symmetry.symmetry_dataset`): the filter's dataset is handed on to the
    duplicate index's canonical form, which is only right when both read the same cell."""
    return structure.lattice.matrix, structure.frac_coords, [site.specie.Z for site in structure]


def _symmetry_dataset(structure: Structure, symprec: float):
    import spglib

    try:
        return spglib.get_symmetry_dataset(spglib_cell(structure), symprec=symprec)
    except Exception:  # spglib signals failure by exception or None depending on version
        return None


@dataclass
class StructureCheck:
    """Results of the filters for one decoded structure; `flags` names each failed check."""

    min_distance: float
    detected_spacegroup: int | None
    flags: list[str]
    # spglib's dataset at the check's symprec (None when not computed or none found): the duplicate
    # index's canonical form starts from the same call instead of repeating it.
    symmetry: object = field(default=None, repr=False, compare=False)


def check_structure(structure: Structure, spacegroup: int, min_dist: float = DEFAULT_MIN_DISTANCE,
                    symprec: float = DEFAULT_SYMPREC) -> StructureCheck:
    """Distance filter (`too_close`) and space-group consistency with spglib (`spacegroup_mismatch`)."""
    d = min_distance(structure)
    flags = []
    if d < min_dist:
        flags.append("too_close")
    # Symmetry of overlapping atoms means nothing (spglib may even merge them), so it is skipped.
    data = _symmetry_dataset(structure, symprec) if d > symprec else None
    found = int(data.number) if data is not None else None
    if found != spacegroup and not flags:
        flags.append("spacegroup_mismatch")
    return StructureCheck(d, found, flags, data)


def find_duplicates_pairwise(structures: list[Structure | None]) -> list[int | None]:
    """The reference answer that `duplicates.find_duplicates` reproduces from canonical forms, at
    quadratic cost: for each structure, the index of an earlier structure it matches (StructureMatcher,
    default tolerances), or None. Only structures with the same reduced formula are compared."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = StructureMatcher()
    seen: dict[str, list[int]] = {}
    out: list[int | None] = []
    for i, s in enumerate(structures):
        if s is None:
            out.append(None)
            continue
        reps = seen.setdefault(s.composition.reduced_formula, [])
        match = next((j for j in reps if matcher.fit(structures[j], s)), None)
        if match is None:
            reps.append(i)
        out.append(match)
    return out
