"""data_prep/label_stability.py: model-labelled crystals (substituted, or the model's own samples) land in
train systems, labelled with the dataset's threshold and marked, and never touch the held-out systems."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from conftest import SLICE
from pymatgen.core import Lattice, Structure
from scripts import REPO, load_script

from wyckoffgpt.data import SequenceDataset, load_meta, split_systems

label_stability = load_script("data_prep/label_stability.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "slice"
    subprocess.run([sys.executable, str(REPO / "data_prep" / "prepare.py"), "--input", str(SLICE), "--out", str(out),
                    "--limit", "120", "--workers", "1", "--split", "system"],
                   check=True, capture_output=True, timeout=300)
    return out


def test_substitution_keeps_cations_on_cation_sites_and_scales_the_cell():
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    kbr = label_stability.substitute(nacl, ["Br", "K"])  # target order does not matter
    assert kbr.composition.reduced_formula == "KBr"
    na_site = [i for i, s in enumerate(nacl) if s.specie.symbol == "Na"]
    assert all(kbr[i].specie.symbol == "K" for i in na_site)
    assert kbr.volume > nacl.volume  # K and Br are larger than Na and Cl
    assert np.allclose(kbr.frac_coords, nacl.frac_coords)


def test_targets_are_train_ternaries_and_sources_other_systems(dataset):
    train = {s for s in split_systems(dataset, "train") if s.count("-") == 2}
    held_out = set(split_systems(dataset, "val")) | set(split_systems(dataset, "test"))
    jobs = label_stability.plan(dataset, 1000, 2, max_atoms=40, seed=0, counts=Counter())
    assert jobs
    source_ids = set(load_meta(dataset)["material_ids"]["train"])
    for key, structure in jobs:
        _, target, source = key.split(":", 2)
        assert target in train and target not in held_out and source in source_ids
        assert "-".join(sorted(el.symbol for el in structure.composition.elements)) == target
    again = label_stability.plan(dataset, 1000, 2, max_atoms=40, seed=0, counts=Counter())
    assert [k for k, _ in again] == [k for k, _ in jobs]  # seeded: a resumed run plans the same jobs


def test_named_targets_are_labelled_and_a_held_out_one_is_refused(dataset, tmp_path, capsys):
    train = sorted(s for s in split_systems(dataset, "train") if s.count("-") == 2)
    chosen = train[:2]
    given = ["-".join(reversed(chosen[0].split("-"))), chosen[1]]  # element order does not matter
    jobs = label_stability.plan(dataset, 1000, 2, max_atoms=40, seed=0, counts=Counter(), targets=given)
    assert jobs and {key.split(":")[1] for key, _ in jobs} <= set(chosen)
    # A held-out system would leak its own labels into training: one line, exit 2, before any relaxation.
    held_out = next(s for s in split_systems(dataset, "test") if s.count("-") == 2)
    code = label_stability.main(["--data", str(dataset), "--out", str(tmp_path / "o"), "--log",
                                 str(tmp_path / "l.jsonl"), "--targets", chosen[0], held_out])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and held_out in err[0] and "train split" in err[0]
    assert not (tmp_path / "l.jsonl").exists()


def records_of(structures, tokenizer, e_hulls):
    """Log records as label_stability writes them (a skipped one has no sequence)."""
    return {f"subst:x:{i}": {"key": f"subst:x:{i}", "e_above_hull": e, "skipped": None if e is not None else "x",
                             "sequence": str(tokenizer.encode(s, e)) if e is not None else None}
            for i, (s, e) in enumerate(zip(structures, e_hulls))}


def test_labelled_rows_join_train_with_the_datasets_threshold(dataset, slice_records, tokenizer, tmp_path):
    threshold = load_meta(dataset)["stability_threshold"]
    structures = [s for _, s in slice_records[:3]]
    records = records_of(structures, tokenizer, [threshold - 1e-3, threshold, None])  # low, high, skipped
    out = tmp_path / "labelled"
    summary = label_stability.write_labelled(dataset, out, records, repeat=2, recipe={"source": "s"})

    before, after = load_meta(dataset), load_meta(out)
    assert summary["classes"] == {"low": 1, "high": 1} and math.isclose(summary["stability_threshold"], threshold)
    assert after["splits"]["train"] == before["splits"]["train"] + 2 * 2
    assert after["splits"]["val"] == before["splits"]["val"] and after["splits"]["test"] == before["splits"]["test"]
    assert after["model_labelled"][-1]["source"] == "s" and after["model_labelled"][-1]["repeat"] == 2
    ids = after["material_ids"]["train"]
    n = len(before["material_ids"]["train"])
    assert ids[:n] == before["material_ids"]["train"] and ids[n:] == ["subst:x:0", "subst:x:1"] * 2
    train = SequenceDataset(out, "train")
    tail = [train[i] for i in range(len(train) - 4, len(train))]
    assert [tokenizer.vocab.tokens[int(t[0][1])] for t in tail] == ["ehull:low", "ehull:high"] * 2
    seq = tokenizer.encode(structures[1], threshold)
    assert np.array_equal(tail[1][0].numpy(), seq.ids)
    assert np.allclose(tail[1][1].numpy(), seq.values.astype(np.float32), equal_nan=True)


def test_existing_output_folder_is_one_line_exit_2(dataset, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({}))
    assert label_stability.main(["--data", str(dataset), "--out", str(out), "--log", str(tmp_path / "l.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]


def test_model_samples_are_planned_in_train_intermetallics_under_both_classes(dataset):
    train = {s for s in split_systems(dataset, "train") if s.count("-") == 2}
    counts = Counter()
    jobs = label_stability.plan_samples(dataset, None, 2, 4, max_atoms=16, seed=0, counts=counts,
                                        intermetallic=True)
    assert jobs and len(jobs) + sum(counts.values()) == 2 * 4  # every sample planned or counted as skipped
    for key, structure in jobs:
        _, system, ehull, _ = key.split(":")
        assert system in train and label_stability.is_intermetallic(system) and ehull in ("low", "high")
        assert "-".join(sorted(el.symbol for el in structure.composition.elements)) == system
        assert len(structure) <= 16
    again = label_stability.plan_samples(dataset, None, 2, 4, max_atoms=16, seed=0, counts=Counter(),
                                         intermetallic=True)
    assert [k for k, _ in again] == [k for k, _ in jobs]  # seeded: a resumed run plans the same jobs


def test_a_labelled_dataset_can_be_labelled_again(dataset, slice_records, tokenizer, tmp_path):
    structures = [s for _, s in slice_records[:2]]
    first, second = tmp_path / "first", tmp_path / "second"
    label_stability.write_labelled(dataset, first, records_of(structures, tokenizer, [0.0, 0.5]), 1, {"source": "a"})
    label_stability.write_labelled(first, second, records_of(structures, tokenizer, [0.0, 0.5]), 1, {"source": "b"})
    assert [r["source"] for r in load_meta(second)["model_labelled"]] == ["a", "b"]
    assert load_meta(second)["splits"]["train"] == load_meta(dataset)["splits"]["train"] + 4


def test_labels_of_a_log_join_train_and_never_a_held_out_system(dataset, slice_records, tokenizer, tmp_path):
    train_system = sorted(split_systems(dataset, "train"))[0]
    test_system = sorted(split_systems(dataset, "test"))[0]
    structures = [s for _, s in slice_records[:2]]
    log = tmp_path / "labels.jsonl"
    records = records_of(structures, tokenizer, [0.0, 0.5])
    rows = [{**r, "key": f"subst:{system}:x{i}"} for i, (r, system) in enumerate(zip(records.values(),
                                                                                   [train_system, test_system]))]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert label_stability.main(["--data", str(dataset), "--out", str(out), "--log", str(log), "--source", "log"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"labelled": 1, "not a train system of --data": 1}
    assert load_meta(out)["material_ids"]["train"][-1] == f"subst:{train_system}:x0"


def test_a_missing_log_is_one_line_exit_2(dataset, tmp_path, capsys):
    assert label_stability.main(["--data", str(dataset), "--out", str(tmp_path / "o"), "--log",
                                 str(tmp_path / "none.jsonl"), "--source", "log"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
