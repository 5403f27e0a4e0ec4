"""Structure -> canonical Wyckoff description, with spglib.

Canonical means one crystal gives one description, whatever its orientation, origin, atom
order or supercell:
1. spglib finds the space group at `symprec` and returns the standardized conventional cell
   in the ITA setting our tables use (origin choice 2, hexagonal axes for R groups, unique
   axis b). If spglib fails, we retry at symprec/10 and then symprec*10 (documented fallback).
2. The same crystal still has several equally standard descriptions: those related by the
   space group's Euclidean normalizer (e.g. swapping 4a and 4b in Fm-3m by an origin shift of
   (1/2,1/2,1/2)), and, in polar groups, a free origin along the polar axes. We enumerate the
   normalizer's coset representatives (pyxtal's tables) and, along polar axes, origins that put
   an atom of the first-ranked orbit at 0, and keep the description with the smallest key.
3. Each orbit's representative is the atom on the position's representative subspace with the
   lexicographically smallest free parameters in [0, 1). Sites are ordered by Wyckoff letter
   (ITA order, a first), then atomic number, then free parameters.
"""
from __future__ import annotations

import math
import warnings
from functools import cache

import numpy as np
import spglib
from pymatgen.core import Lattice, Structure

from .decode import spglib_cell
from .grammar import Site
from .vocab import SpaceGroupTable, Vocab, WyckoffPosition

_MATCH_TOL = 1e-3  # fractional; spglib's standardized positions are symmetrized, so matches are exact to ~1e-8
_KEY_DECIMALS = 4  # values are compared at this precision when choosing among equivalent descriptions


class EncodeError(ValueError):
    """A structure that cannot be written as a sequence; the message names the problem."""


def symmetry_dataset(structure: Structure, symprec: float, vocab: Vocab, known=None):
    """spglib dataset in the setting of our tables, with the documented symprec fallback. `known`:
    spglib's dataset of this structure at `symprec` if already at hand (default: computed here)."""
    cell = spglib_cell(structure)
    with warnings.catch_warnings():
        # spglib 2.x warns on every call that returns None; None is the case we handle here.
        warnings.simplefilter("ignore", DeprecationWarning)
        for sp in (symprec, symprec / 10, symprec * 10):
            data = known if sp == symprec and known is not None else spglib.get_symmetry_dataset(cell, symprec=sp)
            if data is None:
                continue
            table = vocab.group(data.number)
            if data.hall_number != table.hall_number:
                data = spglib.get_symmetry_dataset(cell, symprec=sp, hall_number=table.hall_number)
            if data is not None:
                return data, table
    raise EncodeError(f"spglib found no symmetry (symprec {symprec}, {symprec / 10}, {symprec * 10}); "
                      "atoms may overlap")


def _std_orbits(data, structure: Structure) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per crystallographic orbit: (Z, its atoms in the standardized cell, the input's atoms).

    The standardized atoms (all of them, centering copies included) decide the Wyckoff
    position. The input's own atoms, carried into the standard basis, give the parameter
    values: spglib's symmetrized positions depend on atom order by up to ~1e-4 when the input
    is not exactly symmetric, while a fit over all input atoms does not.
    """
    prim_orbit = dict(zip(data.mapping_to_primitive.tolist(), data.crystallographic_orbits.tolist()))
    orbit_of = np.array([prim_orbit[p] for p in data.std_mapping_to_primitive.tolist()])
    coords = np.asarray(data.std_positions) % 1.0
    types = np.asarray(data.std_types)
    raw = (structure.frac_coords @ np.asarray(data.transformation_matrix).T + data.origin_shift) % 1.0
    raw_orbit = np.asarray(data.crystallographic_orbits)
    return [(int(types[orbit_of == o][0]), coords[orbit_of == o], raw[raw_orbit == o]) for o in np.unique(orbit_of)]


@cache
def _solve_rows(pos: WyckoffPosition) -> list[tuple[int, int, float]]:
    """For each free axis j: a row i of the representative op where j appears alone, and its sign."""
    rep = pos.rotations[0]
    rows = []
    for j in pos.free_axes:
        i = next(i for i in range(3) if rep[i, j] != 0 and np.count_nonzero(rep[i]) == 1)
        rows.append((j, i, rep[i, j]))
    return rows


def _representatives(pos: WyckoffPosition, coords: np.ndarray) -> np.ndarray:
    """Free-parameter vectors of the atoms that lie on the position's representative subspace."""
    rep, t0 = pos.rotations[0], pos.translations[0]
    v = np.zeros_like(coords)
    for j, i, sign in _solve_rows(pos):
        v[:, j] = sign * (coords[:, i] - t0[i])
    v %= 1.0
    diff = v @ rep.T + t0 - coords
    diff -= np.rint(diff)
    on_subspace = np.all(np.abs(diff) < _MATCH_TOL, axis=1)
    return _wrap(v[on_subspace][:, pos.free_axes])


def _canonical_free(pos: WyckoffPosition, orbit_coords: np.ndarray) -> np.ndarray | None:
    """Smallest free-parameter vector among the orbit's atoms on the position's representative
    subspace, or None when no atom lies there (the orbit is not in this position)."""
    if not pos.free:
        diff = pos.translations[0] - orbit_coords
        return np.zeros(0) if np.any(np.all(np.abs(diff - np.rint(diff)) < _MATCH_TOL, axis=1)) else None
    cands = _representatives(pos, orbit_coords)
    if not len(cands):
        return None
    return cands[np.lexsort(np.round(cands, _KEY_DECIMALS).T[::-1])[0]]


def _find_position(table: SpaceGroupTable, orbit_coords: np.ndarray) -> WyckoffPosition:
    """The Wyckoff position of one orbit (positions of equal multiplicity are tried in turn)."""
    for pos in table.positions:
        if pos.multiplicity == len(orbit_coords) and _canonical_free(pos, orbit_coords) is not None:
            return pos
    raise EncodeError(f"an orbit of {len(orbit_coords)} atoms matches no Wyckoff position of space group "
                      f"{table.number}")


def _refine(table: SpaceGroupTable, pos: WyckoffPosition, free: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Least-squares free parameters over the whole orbit.

    spglib's standardized positions are not exactly symmetric when the input is slightly off,
    and which atom we read the parameters from depends on input order; fitting all atoms of the
    orbit at once makes the values independent of it.
    """
    if not pos.free:
        return free
    rot = np.broadcast_to(pos.rotations, (len(table.centering),) + pos.rotations.shape).reshape(-1, 3, 3)
    trans = (pos.translations[None] + table.centering[:, None]).reshape(-1, 3)
    v = np.zeros(3)
    v[pos.free_axes] = free
    expected = rot @ v + trans  # (n, 3)
    delta = coords[:, None, :] - expected[None]  # (atoms, n, 3)
    delta -= np.rint(delta)
    nearest = np.abs(delta).max(axis=2).argmin(axis=1)
    target = coords - np.rint(coords - expected[nearest]) - trans[nearest]
    design = rot[nearest][:, :, pos.free_axes].reshape(-1, len(pos.free))
    fit, *_ = np.linalg.lstsq(design, target.reshape(-1), rcond=None)
    return _wrap(fit)


def _wrap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1), with anything within 1e-6 of an integer set to exactly 0."""
    values = values % 1.0
    values[(values < 1e-6) | (values > 1.0 - 1e-6)] = 0.0
    return values


Orbits = list[tuple[int, np.ndarray, np.ndarray]]  # (Z, standardized atoms, input atoms)


def _moved(orbits: Orbits, rot: np.ndarray, trans: np.ndarray) -> Orbits:
    return [(z, (c @ rot.T + trans) % 1.0, (r @ rot.T + trans) % 1.0) for z, c, r in orbits]


def _describe_variant(table: SpaceGroupTable, orbits: Orbits, positions: list[WyckoffPosition],
                      refine: bool = False):
    sites = []
    for (z, coords, raw), pos in zip(orbits, positions):
        free = _canonical_free(pos, coords)
        sites.append((pos, z, _refine(table, pos, free, raw) if refine else free))
    keyed = sorted((((p.index, z, tuple(round(x, _KEY_DECIMALS) for x in f.tolist())), (p, z, f)) for p, z, f in sites),
                   key=lambda kv: kv[0])
    key = tuple(k for k, _ in keyed)
    sites = [site for _, site in keyed]
    return key, sites


def _polar_origins(table: SpaceGroupTable, orbits: Orbits, positions: list[WyckoffPosition]) -> np.ndarray:
    """Origins to try along the polar axes: each atom of the first-ranked orbits moved to 0."""
    if not table.polar_axes:
        return np.zeros((1, 3))
    ranks = [(pos.index, z) for (z, _, _), pos in zip(orbits, positions)]
    anchors = np.concatenate([c for (z, c, _), r in zip(orbits, ranks) if r == min(ranks)])
    axes = list(table.polar_axes)
    origins = np.zeros_like(anchors)
    origins[:, axes] = anchors[:, axes]
    return origins


def _image_position(table: SpaceGroupTable, op_index: int, pos: WyckoffPosition,
                    moved_coords: np.ndarray) -> WyckoffPosition:
    """The position normalizer operation `op_index` maps `pos` onto (`moved_coords`: an orbit of
    `pos` so moved), searched once per group, operation and position (the search was 40 % of the
    canonical description's time)."""
    key = (op_index, pos.index)
    image = table.position_images.get(key)
    if image is None:
        image = table.position_images[key] = _find_position(table, moved_coords)
    return image


_AFTER_LEAD = ((math.inf,),)  # sorts after every site key


def _lead_key(table: SpaceGroupTable, moved: Orbits, positions: list[WyckoffPosition], origin: np.ndarray) -> tuple:
    """The first-ranked orbits' part of a candidate's key (they sort first), closed by a marker
    that sorts after every site key. Two candidates' lead keys order them as their full keys do
    wherever they differ: a shorter lead part means a later-ranked orbit where the other has a
    first-ranked one. Only candidates with equal lead keys need the other orbits looked at."""
    ranks = [(pos.index, z) for (z, _, _), pos in zip(moved, positions)]
    lead = [i for i, r in enumerate(ranks) if r == min(ranks)]
    shifted = _moved([moved[i] for i in lead], np.eye(3), -origin)
    return _describe_variant(table, shifted, [positions[i] for i in lead])[0] + _AFTER_LEAD


def canonical_sites(table: SpaceGroupTable, orbits: Orbits) -> list[tuple]:
    """Smallest-key description over the normalizer cosets and polar origins (compared on their
    first-ranked orbits first, `_lead_key`: most candidates are decided there)."""
    candidates = []
    found = [_find_position(table, c) for _, c, _ in orbits]
    for op_index, op in enumerate(table.normalizer):
        rot, trans = op[:9].reshape(3, 3), op[9:]
        moved = _moved(orbits, rot, trans)
        # A shift along polar axes maps every orbit onto the same position: find them once.
        positions = [_image_position(table, op_index, pos, c) for pos, (_, c, _) in zip(found, moved)]
        for origin in _polar_origins(table, moved, positions):
            candidates.append((_lead_key(table, moved, positions, origin), moved, positions, origin))
    lead = min(c[0] for c in candidates)
    full = []
    for key, moved, positions, origin in candidates:
        if key == lead:
            shifted = _moved(moved, np.eye(3), -origin)
            full.append((_describe_variant(table, shifted, positions)[0], shifted, positions))
    _, best, positions = min(full, key=lambda kv: kv[0])
    sites = _describe_variant(table, best, positions, refine=True)[1]
    if table.polar_axes:
        # The origin was put on one atom; atoms of a slightly asymmetric input disagree by ~1e-4,
        # so move it onto the fitted position of the first site instead (a multiple of 1/24 there).
        pos, _, free = sites[0]
        v = np.zeros(3)
        v[pos.free_axes] = free
        on_axes = (pos.rotations[0] @ v + pos.translations[0])[list(table.polar_axes)]
        shift = np.zeros(3)
        shift[list(table.polar_axes)] = on_axes - np.rint(on_axes * 24) / 24
        sites = _describe_variant(table, _moved(best, np.eye(3), -shift), positions, refine=True)[1]
    return sites


def describe_structure(structure: Structure, vocab: Vocab, symprec: float = 0.01, known_dataset=None):
    """(space group table, canonical sites, free lattice parameters) of an ordered structure.
    `known_dataset`: see `symmetry_dataset`."""
    if not structure.is_ordered:
        raise EncodeError("structure has partial occupancies; only ordered structures can be encoded")
    if len(structure) == 0:
        raise EncodeError("structure has no atoms")
    data, table = symmetry_dataset(structure, symprec, vocab, known_dataset)
    sites = canonical_sites(table, _std_orbits(data, structure))
    out = [Site(pos, vocab.z_symbol[z], [float(x) for x in free]) for pos, z, free in sites]
    a, b, c, alpha, beta, gamma = Lattice(data.std_lattice).parameters
    params = {"a": a, "b": b, "c": c, "alpha": alpha, "beta": beta, "gamma": gamma}
    return table, out, {k: float(params[k]) for k in table.lattice_free}
