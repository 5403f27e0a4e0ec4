"""data_prep/prepare.py: every input kind, bad rows counted and skipped, a deterministic split."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wyckoffgpt.data import SequenceDataset, load_meta

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ROOT / "data_prep" / "prepare.py"
SLICE = ROOT / "tests" / "data" / "mp_slice.csv.gz"

GOOD_CIF = """data_Po
_symmetry_space_group_name_H-M 'P 1'
_cell_length_a 3.35
_cell_length_b 3.35
_cell_length_c 3.35
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_Int_Tables_number 1
loop_
_symmetry_equiv_pos_as_xyz
 'x, y, z'
loop_
_atom_site_type_symbol
_atom_site_label
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
 Po Po0 0 0 0 1
"""


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREPARE), *args], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)


@pytest.fixture(scope="module")
def messy_csv(tmp_path_factory):
    """40 good rows of the slice plus the bad rows a real export contains."""
    df = pd.read_csv(SLICE).head(40)
    bad = pd.DataFrame({
        "material_id": ["bad-garbage", "bad-empty", "bad-element", "nan-ehull"],
        "e_above_hull": [0.0, 0.0, 0.0, float("nan")],
        "cif": ["this is not a CIF", "", GOOD_CIF.replace("Po Po0", "Xx Xx0"), GOOD_CIF],
    })
    path = tmp_path_factory.mktemp("csv") / "messy.csv"
    pd.concat([df, bad], ignore_index=True).to_csv(path, index=False)
    return path


def test_csv_bad_rows_are_counted_not_fatal(messy_csv, tmp_path):
    out = tmp_path / "ds"
    proc = run_prepare("--input", str(messy_csv), "--out", str(out), "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["rows_read"] == 44
    assert report["skipped_by_reason"] == {"unreadable CIF": 2, "unknown element": 1}  # garbage, empty; Xx
    assert report["kept"] + report["skipped"] == 44
    assert report["stability"]["ehull:unknown"] == 1  # NaN e_above_hull is kept as unknown stability
    assert report["train"] + report["val"] == report["kept"] and report["val"] == round(report["kept"] * 0.1)
    meta = load_meta(out)
    assert meta["splits"] == {"val": report["val"], "train": report["train"]}
    assert len(SequenceDataset(out, "train")) == report["train"]
    assert "ehull" in proc.stdout  # the report is printed too


def test_split_is_deterministic_and_seeded(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for out, seed in ((a, "0"), (b, "0"), (c, "1")):
        assert run_prepare("--input", str(SLICE), "--out", str(out), "--limit", "60", "--seed", seed).returncode == 0
    ids = {p.name: load_meta(p)["material_ids"]["val"] for p in (a, b, c)}
    assert ids["a"] == ids["b"] and ids["a"] != ids["c"]
    assert np.array_equal(np.load(a / "train.ids.npy"), np.load(b / "train.ids.npy"))


def test_cif_folder_and_extxyz_inputs(tmp_path):
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    from wyckoffgpt.structure_io import iter_records, parse_structure

    structures = [parse_structure(r) for r in iter_records(SLICE, limit=12)]
    folder = tmp_path / "cifs"
    folder.mkdir()
    for i, s in enumerate(structures):
        s.to(filename=str(folder / f"s{i}.cif"))
    (folder / "broken.cif").write_text("data_x\n_cell_length_a oops\n")
    proc = run_prepare("--input", str(folder), "--out", str(tmp_path / "from_cifs"))
    report = json.loads((tmp_path / "from_cifs" / "report.json").read_text())
    assert proc.returncode == 0 and report["rows_read"] == 13 and report["skipped_by_reason"]["unreadable CIF"] == 1

    xyz = tmp_path / "frames.extxyz"
    write(str(xyz), [AseAtomsAdaptor.get_atoms(s) for s in structures], format="extxyz")
    proc = run_prepare("--input", str(xyz), "--out", str(tmp_path / "from_xyz"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "from_xyz" / "report.json").read_text())["rows_read"] == 12


@pytest.mark.parametrize("content, message", [("", "is empty"), ("a,b\n1,2\n", "no 'cif' column")])
def test_unusable_input_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "in.csv"
    path.write_text(content)
    proc = run_prepare("--input", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def systems_of(folder: Path, split: str) -> set[str]:
    """Chemical systems of a split, read back from its token sequences."""
    from wyckoffgpt.vocab import default_vocab

    vocab = default_vocab()
    out = set()
    for ids, _ in SequenceDataset(folder, split):
        tokens = [vocab.tokens[i] for i in ids.tolist()]
        out.add("-".join(sorted(tokens[3:3 + int(tokens[2][2:])])))
    return out


def test_system_split_holds_out_whole_systems_of_every_arity(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        proc = run_prepare("--input", str(SLICE), "--out", str(out), "--limit", "300", "--split", "system",
                           "--val-fraction", "0.15", "--test-fraction", "0.15")
        assert proc.returncode == 0, proc.stderr
    meta, report = load_meta(a), json.loads((a / "report.json").read_text())
    assert meta["split"] == "system" and set(meta["splits"]) == {"train", "val", "test"}
    train, val, test = (systems_of(a, k) for k in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    for split in ("val", "test"):  # binaries, ternaries and quaternaries all held out
        assert {2, 3, 4} <= {int(k) for k in report["structures_by_elements"][split]}
        assert 0.05 < meta["splits"][split] / report["kept"] < 0.3
    assert load_meta(a)["material_ids"] == load_meta(b)["material_ids"]  # seeded


def test_random_split_stays_the_default_without_a_test_split(tmp_path):
    out = tmp_path / "r"
    assert run_prepare("--input", str(SLICE), "--out", str(out), "--limit", "40").returncode == 0
    meta = load_meta(out)
    assert meta["split"] == "random" and set(meta["splits"]) == {"train", "val"} and meta["splits"]["val"] == 4


def test_bad_split_fractions_are_one_line_errors(tmp_path):
    proc = run_prepare("--input", str(SLICE), "--out", str(tmp_path / "x"), "--split", "system",
                       "--val-fraction", "0.6", "--test-fraction", "0.5")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "fractions" in proc.stderr


def test_stability_threshold_sets_the_class_boundary_and_is_recorded(tmp_path):
    out = tmp_path / "hull"
    proc = run_prepare("--input", str(SLICE), "--out", str(out), "--limit", "40", "--stability-threshold", "0.001")
    assert proc.returncode == 0, proc.stderr
    meta, report = load_meta(out), json.loads((out / "report.json").read_text())
    kept = set().union(*map(set, meta["material_ids"].values()))
    e = pd.read_csv(SLICE).head(40).set_index("material_id").loc[sorted(kept), "e_above_hull"]
    # Only crystals on the hull (within 1 meV/atom) are ehull:low now.
    assert report["stability"].get("ehull:low", 0) == int((e < 0.001).sum()) > 0
    assert report["stability"].get("ehull:high", 0) == int((e >= 0.001).sum()) > 0
    assert meta["stability_threshold"] == report["stability_threshold"] == 0.001
    bad = run_prepare("--input", str(SLICE), "--out", str(tmp_path / "bad"), "--stability-threshold", "-1")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "stability threshold" in bad.stderr
