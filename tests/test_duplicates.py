"""Duplicates from canonical forms: the same crystal in any orientation, origin, atom order or cell is
one crystal; a changed one is another; the index grows one structure at a time and agrees with
StructureMatcher on the bundled slice."""
from __future__ import annotations

import numpy as np
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp

from wyckoffgpt.decode import find_duplicates_pairwise as matcher_duplicates
from wyckoffgpt.duplicates import DuplicateIndex, MatchTolerances, find_duplicates


def _copies(structure: Structure) -> list[Structure]:
    rotated = structure.copy()
    rotated.apply_operation(SymmOp.from_axis_angle_and_translation((1, 2, 0), 41.0))
    shifted = structure.copy()
    shifted.translate_sites(list(range(len(shifted))), [0.13, 0.27, 0.61])
    supercell = structure.copy()
    supercell.make_supercell([1, 2, 1])
    permuted = Structure.from_sites(list(reversed(structure.sites)))
    jittered = structure.copy()
    shifts = np.random.default_rng(0).normal(size=(len(structure), 3))
    shifts *= 0.002 / np.linalg.norm(shifts, axis=1, keepdims=True)  # below the tokenizer's symprec
    for i, shift in enumerate(shifts):
        jittered.translate_sites([i], shift, frac_coords=False)
    return [rotated, shifted, supercell, permuted, jittered]


def test_copies_of_a_crystal_are_duplicates_of_it(slice_records):
    for _, structure in slice_records[:12]:
        assert find_duplicates([structure, *_copies(structure)]) == [None, 0, 0, 0, 0, 0]


def test_changed_crystals_are_not_duplicates(slice_records):
    _, structure = slice_records[3]
    stretched = structure.copy()
    stretched.lattice = Lattice(stretched.lattice.matrix * np.array([[1.0], [1.0], [1.6]]))  # c 60 % longer
    scaled = structure.copy()
    scaled.scale_lattice(structure.volume * 1.5)  # StructureMatcher compares shapes: a scaled copy is equal
    rocksalt = Structure.from_spacegroup(225, Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cscl = Structure.from_spacegroup(221, Lattice.cubic(3.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert find_duplicates([structure, stretched, scaled, rocksalt, None, cscl]) == [None, None, 0, None, None, None]


def test_index_is_incremental_and_keeps_one_representative_per_crystal(slice_records):
    index = DuplicateIndex()
    a, b = slice_records[5][1], slice_records[6][1]
    assert index.add(a, "a") is None and index.add(b, "b") is None
    assert index.add(_copies(a)[0], "a2") == "a" and index.find(_copies(b)[2]) == "b"
    assert len(index) == 2
    strict = DuplicateIndex(MatchTolerances(stol=1e-4))
    assert strict.add(a, 0) is None and strict.add(_copies(a)[4], 1) is None  # jitter beyond a tiny stol


def test_agrees_with_structure_matcher_on_the_slice(slice_records):
    structures = [s for _, s in slice_records[:40]]
    structures += [c for s in structures[:10] for c in _copies(s)[::2]]
    keyed, matched = find_duplicates(structures), matcher_duplicates(structures)
    assert [m is None for m in keyed] == [m is None for m in matched]
