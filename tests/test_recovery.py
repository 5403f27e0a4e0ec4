"""benchmarks/recovery.py: a stable crystal counts as recovered only when a sample matches it, and a
target the model was trained on is reported as seen, so that memorisation is not taken for transfer."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure
from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
recovery = load_script("benchmarks/recovery.py")


def half_heusler(a: float = 6.0) -> Structure:  # LiCuAl, F-43m
    return Structure.from_spacegroup(216, Lattice.cubic(a), ["Li", "Cu", "Al"],
                                     [[0, 0, 0], [0.25, 0.25, 0.25], [0.5, 0.5, 0.5]])


def full_heusler(a: float = 6.0) -> Structure:  # Li2CuAl, Fm-3m
    return Structure.from_spacegroup(225, Lattice.cubic(a), ["Li", "Cu", "Al"],
                                     [[0.25, 0.25, 0.25], [0, 0, 0], [0.5, 0.5, 0.5]])


def cu3au_like(a: float = 4.0) -> Structure:  # LiCuAl2, Pm-3m
    return Structure.from_spacegroup(221, Lattice.cubic(a), ["Li", "Cu", "Al"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]])


def hexagonal(a: float = 4.2, c: float = 7.0) -> Structure:  # LiCuAl, ZrBeSi type (P6_3/mmc): not a half-Heusler
    return Structure.from_spacegroup(194, Lattice.hexagonal(a, c), ["Li", "Cu", "Al"],
                                     [[0, 0, 0], [1 / 3, 2 / 3, 0.25], [1 / 3, 2 / 3, 0.75]])


def test_known_structure_is_recovered_and_absent_one_is_not():
    sample = half_heusler(6.1)  # strained and rattled: within the matcher's tolerances
    sample.perturb(0.05, min_distance=0.0)
    samples = [full_heusler(), sample, half_heusler(6.2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = recovery.match_targets(samples, [half_heusler(), hexagonal(), cu3au_like()])
    assert [t["matched"] for t in out] == [True, False, False]
    assert out[0]["first_sample"] == 1 and out[0]["rms"] < 0.3  # the first matching sample, in order


def test_only_ternary_systems_with_enough_stable_structures_are_targets():
    Rec = recovery.Record
    rows = [("a", "Al-Cu-Li", Rec("a", None, 0.0)), ("b", "Al-Cu-Li", Rec("b", None, 0.1)),
            ("c", "Al-Cu-Li", Rec("c", None, 0.2)), ("d", "Al-Cu", Rec("d", None, 0.0)),
            ("e", "Ca-Mg-O", Rec("e", None, 0.0))]
    targets = recovery.target_systems(rows, stable_ehull=0.1, min_stable=2)
    assert {s: [k for k, _ in v] for s, v in targets.items()} == {"Al-Cu-Li": ["a", "b"]}


def write_case(tmp_path: Path, model_dir: Path) -> tuple[Path, Path, Path]:
    """An input CSV of three stable Al-Cu-Li crystals and one unstable; a dataset holding them in its
    test split; a copy of the random model whose training crystals (fingerprint index) are two of them."""
    import pandas as pd

    from wyckoffgpt.data import write_dataset
    from wyckoffgpt.fingerprints import build_fingerprint_index
    from wyckoffgpt.tokenizer import CrystalTokenizer

    tokenizer = CrystalTokenizer()
    crystals = {"t-1": (half_heusler(), 0.0), "t-2": (full_heusler(), 0.05), "t-3": (cu3au_like(), 0.08),
                "t-4": (hexagonal(), 0.4)}
    csv = tmp_path / "structures.csv.gz"
    pd.DataFrame([{"material_id": k, "e_above_hull": e, "cif": s.to(fmt="cif")} for k, (s, e) in crystals.items()]
                 ).to_csv(csv, index=False)
    seqs = {k: tokenizer.encode(s, e) for k, (s, e) in crystals.items()}
    vocab = tokenizer.vocab.model_fields()

    def dataset(path: Path, splits: dict[str, list[str]], split: str) -> Path:
        write_dataset(path, {name: [(seqs[k].ids, seqs[k].values) for k in keys] for name, keys in splits.items()},
                      {**vocab, "split": split, "material_ids": splits})
        return path

    data = dataset(tmp_path / "system", {"train": ["t-4"], "val": ["t-4"], "test": ["t-1", "t-2", "t-3", "t-4"]},
                   "system")
    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    build_fingerprint_index(dataset(tmp_path / "random", {"train": ["t-1", "t-2"], "val": ["t-3"]}, "random"),
                            model / "fingerprints.npz")
    return csv, data, model


def test_report_counts_targets_seen_in_training(model_dir, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csv, data, model = write_case(tmp_path, model_dir)
        out = tmp_path / "recovery.json"
        code = recovery.main(["--data", str(data), "--input", str(csv), "--model", str(model), "--n", "4",
                              "--workers", "1", "--large-systems", "1", "--n-large", "6", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report == {k: v for k, v in json.loads(out.read_text()).items() if k != "rows"}
    main, large = report["main"], report["large"]
    assert (main["systems"], main["targets"], main["seen_in_training"], main["unseen"]) == (1, 3, 2, 1)
    assert main["n"] == 4 and large["n"] == 6 and large["targets"] == 3
    assert report["training_data"]["split"] == "random"
    assert "2 of the 3 targets are among the model's training crystals" in stdout
    assert main["per_system"]["Al-Cu-Li"]["targets"] == 3
    assert main["recovered_by_drawn"] == main["recovered"]  # no templates: every sample was drawn


@pytest.mark.parametrize("argv, expected", [
    (["--n", "0"], "--n must be positive"),
    (["--max-systems", "0"], "--max-systems must be positive"),
    (["--split", "train"], "invalid choice"),
    (["--stable-ehull", "nan"], "--stable-ehull must be a finite number"),
    (["--input", "{tmp}/absent.csv"], "does not exist"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, expected, tmp_path, capsys):
    data = tmp_path / "data"
    from synthetic_data import write_synthetic_dataset

    write_synthetic_dataset(data, n_train=2, n_val=1)
    out = tmp_path / "r.json"
    argv = ["--data", str(data), "--out", str(out), *(a.format(tmp=tmp_path) for a in argv)]
    try:
        code = recovery.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("recovery.py: error: ") and expected in lines[0]
    assert not out.exists()


def test_dataset_without_material_ids_is_one_line_exit_2(tmp_path, capsys):
    from synthetic_data import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n_train=2, n_val=1)
    code = recovery.main(["--data", str(data), "--input", str(REPO / "tests" / "data" / "mp_slice.csv.gz")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "no material ids for split 'test'" in lines[0]


def test_known_skeletons_without_training_crystals_is_one_line_exit_2(model_dir, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csv, data, _ = write_case(tmp_path, model_dir)  # model_dir itself has no fingerprints.npz
        code = recovery.main(["--data", str(data), "--input", str(csv), "--model", str(model_dir), "--n", "4",
                              "--workers", "1", "--analogues", "2", "--analogue-source", "known"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("recovery.py: error: --analogue-source known needs the model's training crystals")
