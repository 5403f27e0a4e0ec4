"""Quality metrics and the training fingerprint index: SMACT screening, uniqueness, novelty against
the training split or another reference, the validity chain and distribution statistics on hand-made
sample sets with known answers, the prototype stability proxy, and an index that round-trips and
stays small."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice
from pymatgen.core.operations import SymmOp

from wyckoffgpt import chemistry, metrics
from wyckoffgpt.data import SequenceDataset, write_dataset
from wyckoffgpt.descriptions import structure_prototype
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
    assert all(chemistry.smact_valid(f) for f in ("NaCl", "Fe2O3", "LiFePO4", "Cu3Al"))  # Cu3Al: an alloy
    assert not any(chemistry.smact_valid(f) for f in ("Na2Cl", "NaF3", "K5O", "He2O"))
    assert chemistry.smact_valid(Composition("Na4Cl4")) is True  # ratios count, not the cell size


def test_ionic_charge_check_allows_mixed_valence_and_intermetallics_but_not_absurd_salts():
    # Spinel LiMn2O4 and magnetite need two Mn / Fe oxidation states; Er5Si3 and NdB6 are intermetallic.
    for formula in ("LiMn2O4", "Fe3O4", "Er5Si3", "NdB6"):
        assert not chemistry.smact_valid(formula)
        assert chemistry.passes_charge_check(formula, "ionic") and not chemistry.passes_charge_check(formula, "smact")
    for formula in ("CdO7", "KCoCl18", "Na2Cl"):
        assert not chemistry.passes_charge_check(formula, "ionic") and chemistry.passes_charge_check(formula, "off")
    assert chemistry.passes_charge_check("NaCl", "ionic") and chemistry.passes_charge_check("NaCl", "smact")
    with pytest.raises(ValueError, match="charge check"):
        chemistry.passes_charge_check("NaCl", "strict")


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
    low_keys = [structure_prototype(s, tokenizer) for s in low]
    high_keys = [structure_prototype(s, tokenizer) for s in high]
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
                           "--data", str(dataset), "--n", "8", "--temperatures", "1.0", "--out", str(out),
                           "--reference", str(dataset)],
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    rows = last["models"][0]["samples"]
    assert [r["ehull"] for r in rows] == ["none", "low", "high"] and all(r["n"] == 8 for r in rows)
    assert str(dataset) in last["reference"] and "train split" in last["reference"]
    assert all("wasserstein_density" in r and "dist_valid_0.5" in r for r in rows)
    assert last["models"][0]["validation"]["sequences"] == N_VAL
    assert "| model | T | ehull |" in proc.stdout


# -- sample-set metrics on hand-made cases with known answers -------------------------------------

def rocksalt(a: float = 5.64, formula=("Na", "Cl")):
    from pymatgen.core import Structure

    return Structure.from_spacegroup(225, Lattice.cubic(a), list(formula), [[0, 0, 0], [0.5, 0.5, 0.5]])


def cscl_type(a: float = 3.3):
    from pymatgen.core import Structure

    return Structure(Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def sample(structure, spacegroup: int, index: int = 0):
    """A GeneratedCrystal as the generator makes it: the 0.7 Å distance filter and the space-group check."""
    from wyckoffgpt.decode import check_structure
    from wyckoffgpt.generation import GeneratedCrystal

    check = check_structure(structure, spacegroup)
    return GeneratedCrystal(index, None, structure, spacegroup, check.detected_spacegroup, check.min_distance, 1.0,
                            check.flags)


def reference_of(structures: dict, name: str = "hand-made") -> metrics.ReferenceSet:
    return metrics.ReferenceSet.from_structures(structures, name)


def test_duplicate_pair_counts_once():
    nacl = rocksalt()
    twin = nacl.copy()
    twin.make_supercell([1, 2, 1])
    twin.apply_operation(SymmOp.from_axis_angle_and_translation((0, 0, 1), 30.0))
    m = metrics.sample_set_metrics([sample(nacl, 225), sample(twin, 225), sample(cscl_type(), 221)], None)
    assert (m.valid, m.unique) == (3, 2)
    assert m.unique_flags == [True, False, True]
    assert m.row()["unique"] == pytest.approx(2 / 3)
    assert m.novel is None and m.row()["novel"] is None and m.reference is None  # no reference, no novelty


def test_structure_copied_from_the_reference_is_not_novel():
    nacl = rocksalt()
    copy = nacl.copy()
    copy.translate_sites(list(range(len(copy))), [0.1, 0.2, 0.3])  # same crystal, shifted origin
    reference = reference_of({"ref-1": nacl, "ref-2": rocksalt(4.2, ("K", "F"))}, "two salts")
    assert reference.find_match(copy) == "ref-1"
    # CsCl-type NaCl: same formula, another structure; NaF: a formula the reference lacks
    samples = [sample(copy, 225), sample(cscl_type(), 221), sample(rocksalt(4.6, ("Na", "F")), 225)]
    m = metrics.sample_set_metrics(samples, reference)
    assert m.novel_flags == [False, True, True]
    assert m.row()["novel"] == pytest.approx(2 / 3) and m.row()["n_novel"] == 2
    assert m.row()["reference"] == "two salts"


def test_charge_imbalanced_composition_is_not_smact_valid():
    from pymatgen.core import Structure

    # The antifluorite structure (Li2O's) with Na and Cl: Na+ Na+ Cl- is not charge neutral.
    na2cl = Structure.from_spacegroup(225, Lattice.cubic(6.5), ["Cl", "Na"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    assert na2cl.composition.reduced_formula == "Na2Cl"
    assert not chemistry.smact_valid(na2cl.composition) and chemistry.smact_valid("NaCl")
    m = metrics.sample_set_metrics([sample(rocksalt(), 225), sample(na2cl, 225)], None)
    assert (m.decoded, m.smact_valid) == (2, 1)
    assert m.row()["smact_valid"] == 0.5


def test_atoms_0_3_angstrom_apart_fail_both_distance_thresholds():
    from pymatgen.core import Structure

    lattice = Lattice.cubic(5.0)
    clash = Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.06, 0, 0]])  # 0.3 Å apart
    near = Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.12, 0, 0]])  # 0.6 Å: passes 0.5, fails 0.7
    fine = Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    results = [sample(s, 221) for s in (clash, near, fine)]
    assert results[0].min_distance == pytest.approx(0.3) and "too_close" in results[0].flags
    m = metrics.sample_set_metrics(results, None)
    assert (m.decoded, m.dist_valid_05, m.valid) == (3, 2, 1)
    row = m.row()
    assert row["dist_valid_0.5"] == pytest.approx(2 / 3) and row["valid"] == pytest.approx(1 / 3)
    assert row["n_valid"] == 1 and row["unique"] == 1.0  # rates of the valid ones: the one valid sample


def test_distribution_distances_against_a_known_reference():
    dense = rocksalt(5.64)
    light = dense.copy()
    light.scale_lattice(2 * dense.volume)  # half the density
    d = dense.density
    # Reference: two ternary crystals, both of the dense sample's density, one cubic and one hexagonal.
    reference = metrics.ReferenceSet("known", lambda s: None, np.array([d, d]), np.array([3, 3]),
                                     ["cubic", "hexagonal"])
    m = metrics.sample_set_metrics([sample(dense, 225), sample(light, 225)], reference)
    # Earth mover's distance: half the samples move by d/2, the other half not at all.
    assert m.wasserstein_density == pytest.approx(d / 4)
    assert m.wasserstein_n_elements == pytest.approx(1.0)  # every sample has 2 elements, the reference 3
    assert m.crystal_systems["cubic"] == 1.0 and sum(m.crystal_systems.values()) == pytest.approx(1.0)
    assert m.crystal_system_tvd == pytest.approx(0.5)
    assert m.novel == 2  # nothing matches


def test_reference_from_a_csv_of_cifs_and_from_a_dataset_folder(slice_records, dataset, tmp_path):
    import pandas as pd

    records = slice_records[:6]
    csv_path = tmp_path / "ref.csv"
    pd.DataFrame({"material_id": [r.key for r, _ in records], "cif": [r.cif for r, _ in records]}).to_csv(csv_path)
    ref = metrics.load_reference(csv_path)
    assert str(csv_path) in ref.name and "6 structures" in ref.name and len(ref) == 6
    assert ref.find_match(records[2][1]) == records[2][0].key
    assert np.allclose(ref.densities, [s.density for _, s in records])

    from_dataset = metrics.load_reference(dataset)
    assert "train split" in from_dataset.name and len(from_dataset) == N_TRAIN
    assert from_dataset.find_match(slice_records[0][1]) == slice_records[0][0].key
    assert from_dataset.find_match(slice_records[N_TRAIN][1]) is None  # a val crystal
    # densities read from the sequences agree with the decoded structures'
    assert sorted(from_dataset.densities) == pytest.approx(sorted(s.density for _, s in slice_records[:N_TRAIN]),
                                                           rel=1e-3)
    with pytest.raises(ValueError, match="does not exist"):
        metrics.load_reference(tmp_path / "missing.csv")


def test_wyckoffgpt_imports_form_no_cycle_and_chemistry_needs_no_spglib():
    import ast

    package = REPO / "wyckoffgpt"
    graph = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        # top-level imports only: imports inside functions are deliberate deferrals
        graph[path.stem] = {node.module for node in tree.body
                            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    state: dict[str, int] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert state.get(name) != 1, f"import cycle: {' -> '.join(trail + (name,))}"
        if state.get(name) == 2 or name not in graph:
            return
        state[name] = 1
        for dep in graph[name]:
            visit(dep, trail + (name,))
        state[name] = 2

    for name in graph:
        visit(name, ())
    assert "metrics" not in graph["fingerprints"]
    code = ("import sys; from wyckoffgpt import composition; "
            "assert composition.sequence_features.__module__ and composition._charge_balanced((('Na', 1), ('Cl', 1))); "
            "assert 'spglib' not in sys.modules, 'spglib imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-1000:]


def test_wilson_interval_brackets_the_rate_and_stays_in_bounds():
    lo, hi = metrics.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = metrics.wilson_interval(0, 10)  # no successes still gives a useful upper bound
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert metrics.wilson_interval(10, 10)[1] == 1.0
    assert all(np.isnan(metrics.wilson_interval(0, 0)))
