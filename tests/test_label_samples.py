"""data_prep/label_samples.py: model-labelled rows join the train split, marked, with the funnel's class."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import SLICE
from scripts import REPO, load_script

from wyckoffgpt.data import SequenceDataset, load_meta, split_systems

label_samples = load_script("data_prep/label_samples.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "slice"
    subprocess.run([sys.executable, str(REPO / "data_prep" / "prepare.py"), "--input", str(SLICE), "--out", str(out),
                    "--limit", "120", "--workers", "1", "--split", "system"],
                   check=True, capture_output=True, timeout=300)
    return out


def records_of(structures, tokenizer, e_hulls):
    """Log records as label_samples writes them: the sample's sequence and its e_above_hull."""
    return {f"model:x:low:{i}": {"key": f"model:x:low:{i}", "e_above_hull": e,
                                  "skipped": None if e is not None else "disconnected",
                                  "sequence": str(tokenizer.encode(s))}
            for i, (s, e) in enumerate(zip(structures, e_hulls))}


def test_labelled_rows_join_train_with_the_funnels_class(dataset, slice_records, tokenizer, tmp_path):
    structures = [s for _, s in slice_records[:3]]
    records = records_of(structures, tokenizer, [0.02, 0.31, None])  # low, high, skipped
    out = tmp_path / "labelled"
    summary = label_samples.write_labelled(dataset, out, records, repeat=2, recipe={"model": "m"})

    before, after = load_meta(dataset), load_meta(out)
    assert summary["classes"] == {"low": 1, "high": 1} and summary["sequences"] == 2
    assert after["splits"]["train"] == before["splits"]["train"] + 2 * 2
    assert after["splits"]["val"] == before["splits"]["val"] and after["splits"]["test"] == before["splits"]["test"]
    assert after["model_labelled"]["repeat"] == 2 and after["model_labelled"]["model"] == "m"
    # Marked as model-labelled, and the MP rows are untouched.
    ids = after["material_ids"]["train"]
    assert ids[: len(before["material_ids"]["train"])] == before["material_ids"]["train"]
    assert ids[len(before["material_ids"]["train"]):] == ["model:x:low:0", "model:x:low:1"] * 2
    train = SequenceDataset(out, "train")
    vocab = tokenizer.vocab
    tail = [train[i] for i in range(len(train) - 4, len(train))]
    classes = [vocab.tokens[int(ids[1])] for ids, _ in tail]
    assert classes == ["ehull:low", "ehull:high"] * 2
    # Apart from the class token, the row is the sample's sequence, values included.
    seq = tokenizer.encode(structures[1])
    assert np.array_equal(tail[1][0].numpy()[2:], seq.ids[2:])
    assert np.allclose(tail[1][1].numpy(), seq.values.astype(np.float32), equal_nan=True)
    old = SequenceDataset(dataset, "val")
    new = SequenceDataset(out, "val")
    assert all(np.array_equal(old[i][0], new[i][0]) for i in range(len(old)))


def test_systems_come_from_the_train_split_only(dataset):
    train = {s for s in split_systems(dataset, "train") if s.count("-") == 2}
    held_out = set(split_systems(dataset, "val")) | set(split_systems(dataset, "test"))
    picked = label_samples.pick_systems(dataset, 1000, 3, seed=0)
    assert set(picked) == train and not set(picked) & held_out
    assert label_samples.pick_systems(dataset, 3, 3, seed=1) == label_samples.pick_systems(dataset, 3, 3, seed=1)


def test_threshold_is_the_datasets(dataset, slice_records, tokenizer, tmp_path):
    threshold = load_meta(dataset)["stability_threshold"]
    s = slice_records[0][1]
    records = records_of([s, s], tokenizer, [threshold - 1e-3, threshold])
    summary = label_samples.write_labelled(dataset, tmp_path / "o", records, repeat=1, recipe={})
    assert summary["classes"] == {"low": 1, "high": 1} and math.isclose(summary["stability_threshold"], threshold)


def test_existing_output_folder_is_one_line_exit_2(dataset, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({}))
    assert label_samples.main(["--data", str(dataset), "--out", str(out), "--log", str(tmp_path / "l.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]
