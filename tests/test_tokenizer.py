"""The Wyckoff representation: exact, canonical, and strict about bad input."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp

from wyckoffgpt import CrystalSequence, DecodeError, EncodeError
from wyckoffgpt.fuzzing import fuzz_decode
from wyckoffgpt.vocab import default_vocab

ROOT = Path(__file__).resolve().parent.parent


def _crystal_system(seq: CrystalSequence) -> str:
    sg = int(next(t for t in seq.tokens if t.startswith("sg:"))[3:])
    return default_vocab().group(sg).crystal_system


def test_round_trip_covers_all_crystal_systems(slice_records, tokenizer):
    strict, loose = StructureMatcher(), StructureMatcher(attempt_supercell=True)
    systems, failures = set(), []
    for rec, s in slice_records:
        seq = tokenizer.encode(s, rec.e_above_hull)
        if "sg:1" in seq.tokens:
            continue
        systems.add(_crystal_system(seq))
        back = tokenizer.decode(seq)
        if not (strict.fit(s, back) or loose.fit(s, back)):
            failures.append(rec.key)
    assert len(systems) == 7
    assert failures == []


def test_sequence_layout_and_values(tokenizer):
    rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    seq = tokenizer.encode(rocksalt, e_above_hull=0.0)
    assert seq.tokens[:5] == ["<bos>", "ehull:low", "n:2", "Na", "Cl"]
    assert seq.tokens[5] == "sg:225"
    assert seq.tokens[-2:] == ["a", "<eos>"] and seq.values[-2] == pytest.approx(5.64)
    assert np.isnan(seq.values[:-2]).all()
    # Na and Cl on 4a/4b: the canonical choice puts the lighter element on 4a (origin shift is free).
    assert [tokenizer.vocab.group(225).by_orbit[t].letter for t in seq.tokens[6:10:2]] == ["a", "b"]


def test_stability_threshold_and_unknown(tokenizer):
    s = Structure(Lattice.cubic(3.0), ["Po"], [[0, 0, 0]])
    assert tokenizer.encode(s, 0.07).tokens[1] == "ehull:low"
    assert tokenizer.encode(s, 0.075).tokens[1] == "ehull:high"
    assert tokenizer.encode(s).tokens[1] == "ehull:unknown"
    with pytest.raises(EncodeError, match="finite number, or None"):
        tokenizer.encode(s, math.nan)


def _variants(s: Structure, rng: np.random.Generator) -> dict[str, Structure]:
    moved = s.copy()
    moved.translate_sites(range(len(moved)), rng.random(3))
    rotated = s.copy()
    rotated.apply_operation(SymmOp.from_axis_angle_and_translation(rng.normal(size=3), rng.uniform(0, 360)))
    shuffled = Structure.from_sites([s[i] for i in rng.permutation(len(s))])
    return {"translated": moved, "rotated": rotated, "permuted": shuffled, "supercell": s * (1, 2, 1)}


def test_encoding_is_invariant_to_setting(slice_records, tokenizer):
    rng = np.random.default_rng(0)
    polar_or_low = 0
    for rec, s in slice_records[::4]:
        ref = tokenizer.encode(s)
        table = tokenizer.vocab.group(int(next(t for t in ref.tokens if t.startswith("sg:"))[3:]))
        polar_or_low += bool(table.polar_axes) or table.crystal_system in ("triclinic", "monoclinic")
        for name, variant in _variants(s, rng).items():
            got = tokenizer.encode(variant)
            assert got.tokens == ref.tokens, (rec.key, name)
            assert np.allclose(got.values, ref.values, atol=1e-4, equal_nan=True), (rec.key, name)
    assert polar_or_low >= 10  # the hard cases (free origin, low symmetry) are really exercised


def test_string_round_trip(slice_records, tokenizer):
    for rec, s in slice_records[:50]:
        seq = tokenizer.encode(s, rec.e_above_hull)
        text = str(seq)
        assert CrystalSequence.from_string(text) == seq
        assert "x=" in text or "a=" in text


def test_vocab_regeneration_is_byte_identical(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "vocab" / "build_vocab.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("wyckoff_tables.json", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (ROOT / "vocab" / name).read_bytes(), name


def test_vocab_contents():
    vocab = default_vocab()
    assert len(vocab.orbit_tokens) == 940
    assert sum(len(vocab.group(n).positions) for n in range(1, 231)) == 1731
    assert {"H", "Pu", "sg:1", "sg:230", "ehull:low", "ehull:high", "ehull:unknown", "<pad>", "n:1"} <= set(vocab.tokens)
    # Shared orbit: (0,y,0),(0,-y,0) is one token in groups 10, 16 and 47, as in the paper.
    orbit = vocab.group(10).by_letter["i"].orbit
    assert orbit in vocab.group(16).by_orbit and orbit in vocab.group(47).by_orbit
    # A position without free parameters cannot be occupied twice; the general position can.
    assert not vocab.group(225).by_letter["a"].repeatable and vocab.group(225).positions[-1].repeatable


def test_vocab_element_numbers_match_the_periodic_table():
    from pymatgen.core.periodic_table import Element

    vocab = default_vocab()
    assert len(vocab.element_ids) == 103
    assert all(vocab.element_z[i] == Element(symbol).Z for symbol, i in vocab.element_ids.items())
    assert vocab.z_symbol[39] == "Y" and "y" not in vocab.element_ids  # yttrium, not the coordinate


def test_hf_tokenizer_loads_vocabulary(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token == "<eos>" and hf.pad_token_id == tokenizer.vocab.pad_id
    assert hf("<bos> ehull:low n:1 Fe sg:229")["input_ids"] == [tokenizer.vocab.token_to_id[t] for t in
                                                                 ["<bos>", "ehull:low", "n:1", "Fe", "sg:229"]]


# -- bad input ---------------------------------------------------------------------------------

def test_unknown_element_symbol_is_a_clear_error(tokenizer):
    with pytest.raises(DecodeError, match="unknown token 'Xx'"):
        CrystalSequence.from_string("<bos> ehull:low n:1 Xx sg:229")
    heavy = Structure(Lattice.cubic(3.0), ["Og"], [[0, 0, 0]])
    with pytest.raises(EncodeError, match="Og is not in the vocabulary"):
        tokenizer.encode(heavy)


def test_orbit_of_another_space_group_is_rejected(tokenizer):
    # w225 orbits do not exist in P1; 'w1a' (general position of P1) is not in Fm-3m either.
    seq = CrystalSequence.from_string("<bos> ehull:low n:1 Cu sg:225 w1a Cu x=0.1 y=0.2 z=0.3 a=3.6 <eos>")
    with pytest.raises(DecodeError, match="not in space group 225"):
        tokenizer.decode(seq)


@pytest.mark.parametrize("text, problem", [
    ("ehull:low n:1 Cu sg:225", "start with <bos>"),
    ("<bos> ehull:low n:1 Cu sg:225 w22a Cu a=3.6", "ends early"),
    ("<bos> ehull:low n:2 Cu Al sg:225", "increasing atomic number"),
    ("<bos> ehull:low n:2 Al Cu sg:225 w22a Cu a=3.6 <eos>", "occupy no site"),
    ("<bos> ehull:low n:1 Cu sg:225 w22a Cu w22a Cu a=3.6 <eos>", "already occupied"),
    ("<bos> ehull:low n:1 Cu sg:225 w22a Cu a=-3.6 <eos>", "not positive"),
    ("<bos> ehull:low n:1 Cu sg:225 w22a Cu a=nan <eos>", "not finite"),
    ("<bos> ehull:low n:1 Cu sg:2 w2a Cu a=3 b=3 c=3 alpha=150 beta=150 gamma=150 <eos>", "do not form a cell"),
])
def test_invalid_sequences_name_the_problem(tokenizer, text, problem):
    with pytest.raises(DecodeError, match=problem):
        tokenizer.decode(CrystalSequence.from_string(text))


def test_every_parser_phase_has_both_handlers():
    # The parser dispatches on its phase: a phase without a handler fails when the class is made,
    # instead of falling through to another phase's rule.
    from wyckoffgpt.grammar import Phase, SequenceParser, _handlers

    assert set(SequenceParser._FEEDERS) == set(SequenceParser._MASKS) == set(Phase)

    class Incomplete(SequenceParser):
        _mask_site_values = None

    with pytest.raises(TypeError, match="no handler _mask_site_values"):
        _handlers(Incomplete, "_mask_")


def test_decode_fuzz_raises_only_decode_error(slice_records, tokenizer):
    seeds = [tokenizer.encode(s) for _, s in slice_records[:30]]
    result = fuzz_decode(tokenizer, seeds, n=3000, seed=1)
    assert result["crashes"] == 0, result["first_crashes"]
    assert result["rejected"] > 1000 and result["decoded"] > 0  # both paths are exercised
