"""Quality metrics and the training fingerprint index: SMACT screening, uniqueness, novelty against
the training split, the prototype stability proxy, and an index that round-trips and stays small."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice
from pymatgen.core.operations import SymmOp

from wyckoffgpt import metrics
from wyckoffgpt.data import SequenceDataset, write_dataset
from wyckoffgpt.fingerprints import FingerprintIndex, build_fingerprint_index
from wyckoffgpt.vocab import default_vocab

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL = 30, 10


def e_above_hull(i: int, record) -> float:
    # The slice's first crystals are all near the hull; every 4th is relabelled high so both labels occur.
    return 0.3 if i % 4 == 0 else record.e_above_hull


@pytest.fixture(scope="module")
def dataset(slice_records, tokenizer, tmp_path_factory):
    """A tiny dataset of the first slice crystals (train 30, val 10), encoded here, as data_prep would."""
    records = slice_records[:N_TRAIN + N_VAL]
    seqs = [tokenizer.encode(s, e_above_hull(i, r)) for i, (r, s) in enumerate(records)]
    splits = {"train": [(q.ids, q.values) for q in seqs[:N_TRAIN]], "val": [(q.ids, q.values) for q in seqs[N_TRAIN:]]}
    ids = [r.key for r, _ in records]
    meta = {**default_vocab().model_fields(), "material_ids": {"train": ids[:N_TRAIN], "val": ids[N_TRAIN:]}}
    out = tmp_path_factory.mktemp("ds")
    write_dataset(out, splits, meta)
    return out


@pytest.fixture(scope="module")
def index_path(dataset, tmp_path_factory):
    return build_fingerprint_index(dataset, tmp_path_factory.mktemp("model") / "fingerprints.npz")


@pytest.fixture(scope="module")
def index(index_path):
    return FingerprintIndex.load(index_path.parent)  # a model folder resolves to its fingerprints.npz


def test_smact_accepts_charge_balanced_and_rejects_absurd_compositions():
    assert all(metrics.smact_valid(f) for f in ("NaCl", "Fe2O3", "LiFePO4", "Cu3Al"))  # Cu3Al: an alloy
    assert not any(metrics.smact_valid(f) for f in ("Na2Cl", "NaF3", "K5O", "He2O"))
    assert metrics.smact_valid(Composition("Na4Cl4")) is True  # ratios count, not the cell size


def test_ionic_charge_check_allows_mixed_valence_and_intermetallics_but_not_absurd_salts():
    # Spinel LiMn2O4 and magnetite need two Mn / Fe oxidation states; Er5Si3 and NdB6 are intermetallic.
    for formula in ("LiMn2O4", "Fe3O4", "Er5Si3", "NdB6"):
        assert not metrics.smact_valid(formula)
        assert metrics.passes_charge_check(formula, "ionic") and not metrics.passes_charge_check(formula, "smact")
    for formula in ("CdO7", "KCoCl18", "Na2Cl"):
        assert not metrics.passes_charge_check(formula, "ionic") and metrics.passes_charge_check(formula, "off")
    assert metrics.passes_charge_check("NaCl", "ionic") and metrics.passes_charge_check("NaCl", "smact")
    with pytest.raises(ValueError, match="charge check"):
        metrics.passes_charge_check("NaCl", "strict")


def test_training_crystal_is_not_novel_even_rotated_or_as_supercell(slice_records, index):
    record, structure = slice_records[3]
    twin = structure.copy()
    twin.make_supercell([2, 1, 1])
    twin.apply_operation(SymmOp.from_axis_angle_and_translation((1, 1, 0), 37.0))
    assert index.find_match(structure) == record.key
    assert index.find_match(twin) == record.key
    assert metrics.novel_flags([structure, twin], index) == [False, False]


def test_changed_or_held_out_crystal_is_novel(slice_records, index):
    _, structure = slice_records[3]
    stretched = structure.copy()
    stretched.lattice = Lattice(stretched.lattice.matrix * np.array([[1.0], [1.0], [1.6]]))  # c 60 % longer
    val_record, val_structure = slice_records[N_TRAIN]  # val split: never in the index
    assert len(index.entries(val_structure.composition.reduced_formula)) == 0
    assert metrics.novel_flags([stretched, val_structure], index) == [True, True]


def test_uniqueness_counts_duplicates(slice_records):
    a, b = slice_records[5][1], slice_records[6][1]
    a_super = a.copy()
    a_super.make_supercell([1, 1, 2])
    a_jitter = a.copy()
    a_jitter.perturb(0.01, min_distance=0.005)
    flags = metrics.unique_flags([a, a_super, b, a_jitter])
    assert flags == [True, False, True, False]
    assert metrics.fraction(flags) == 0.5
    assert metrics.fraction([]) is None


def test_index_round_trips_the_training_split_exactly(dataset, index, tokenizer):
    ds = SequenceDataset(dataset, "train")
    train_ids = json.loads((dataset / "meta.json").read_text())["material_ids"]["train"]
    assert len(index) == N_TRAIN and set(map(str, index.material_ids)) == set(train_ids)
    assert index.meta["split"] == "train"
    for i in range(len(index)):
        ids, values = ds[train_ids.index(str(index.material_ids[i]))]
        seq = index.sequence(i)
        assert np.array_equal(seq.ids, ids.numpy())
        assert np.array_equal(seq.values, values.numpy().astype(np.float64), equal_nan=True)
        # grouped by formula: each entry sits in its own formula's block
        assert i in index.entries(index.structure(i).composition.reduced_formula)


def test_index_is_compact_and_written_atomically(dataset, index_path):
    ds = SequenceDataset(dataset, "train")
    raw = len(ds.ids) * (2 + 4)  # int16 ids + float32 values, as in the dataset
    assert index_path.stat().st_size < raw + 4000  # fixed npz/metadata overhead only on top
    with np.load(index_path) as npz:
        assert npz["ids"].dtype == np.int16 and npz["values"].dtype == np.float32
        assert len(npz["values"]) == int(np.isfinite(ds.values).sum())  # only the value tokens' values
    assert [p.name for p in index_path.parent.iterdir()] == ["fingerprints.npz"]  # no temp files left


def test_index_needs_material_ids(dataset, tmp_path):
    meta = json.loads((dataset / "meta.json").read_text())
    del meta["material_ids"]
    for p in dataset.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="material ids"):
        build_fingerprint_index(tmp_path, tmp_path / "fp.npz")
    assert not (tmp_path / "fp.npz").exists()


def test_stability_proxy_finds_low_ehull_prototypes_only(slice_records, index, tokenizer):
    train = [(e_above_hull(i, r) < tokenizer.stability_threshold, s)
             for i, (r, s) in enumerate(slice_records[:N_TRAIN])]
    low = [s for is_low, s in train if is_low]
    high = [s for is_low, s in train if not is_low]
    assert low and high
    low_keys = [metrics.structure_prototype(s, tokenizer) for s in low]
    high_keys = [metrics.structure_prototype(s, tokenizer) for s in high]
    assert metrics.low_prototype_flags(low_keys, index) == [True] * len(low)
    assert metrics.low_prototype_flags(high_keys + [None], index) == [False] * (len(high) + 1)
    # the key reads as formula | space group | Wyckoff letter:element multiset
    formula, sg, sites = low_keys[0].split("|")
    assert formula == low[0].composition.reduced_formula and sg.isdigit() and ":" in sites


def test_quality_benchmark_runs_end_to_end(dataset, tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from random_model import save_random_model

    model = save_random_model(tmp_path / "model")
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--model", str(model),
                           "--data", str(dataset), "--n", "8", "--temperatures", "1.0", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    rows = last["models"][0]["samples"]
    assert [r["ehull"] for r in rows] == ["none", "low", "high"] and all(r["n"] == 8 for r in rows)
    assert last["models"][0]["validation"]["sequences"] == N_VAL
    assert "| model | T | ehull |" in proc.stdout
