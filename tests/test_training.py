"""Dataset format and the training loop: export, resume, accumulation, precision, errors, CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic_data import BOS, EOS, PAD, VOCAB, make_sequences, write_synthetic_dataset
from transformers import AutoModel

import wyckoffgpt  # noqa: F401  (registers the Auto classes)
from wyckoffgpt.data import DatasetError, SequenceDataset, collate, load_meta, write_dataset
from wyckoffgpt.training import TrainConfig, TrainingError, train

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", n_train=64, n_val=16, seed=0)


def quick(data: Path, out: Path, **kw) -> TrainConfig:
    defaults = dict(model_preset="tiny", batch_size=8, max_steps=6, eval_every=3, log_every=1, save_every=0, progress=False)
    return TrainConfig(data_dir=str(data), out_dir=str(out), **{**defaults, **kw})


def log_rows(out: Path) -> list[dict[str, str]]:
    with (out / "train_log.csv").open() as f:
        return list(csv.DictReader(f))


# -- dataset format ------------------------------------------------------------------------------


def test_dataset_round_trip(tmp_path):
    seqs = make_sequences(5, seed=3)
    write_dataset(tmp_path / "d", {"train": seqs, "val": seqs[:2]}, VOCAB)
    meta = load_meta(tmp_path / "d")
    assert meta["format"] == "wyckoffgpt-dataset-v1"
    assert meta["splits"] == {"train": 5, "val": 2}
    assert meta["max_length"] == max(len(i) for i, _ in seqs)
    assert np.load(tmp_path / "d" / "train.ids.npy").dtype == np.int16
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.endswith(".tmp")]
    ds = SequenceDataset(tmp_path / "d", "train")
    assert len(ds) == 5
    for (ids, vals), (ref_ids, ref_vals) in zip((ds[i] for i in range(5)), seqs):
        assert ids.tolist() == ref_ids.tolist() and ids[0] == BOS and ids[-1] == EOS
        np.testing.assert_array_equal(vals.numpy(), ref_vals)  # NaN positions included
    batch = collate([ds[0], ds[1]], PAD)
    short = min(len(ds[0][0]), len(ds[1][0]))
    longest = max(len(ds[0][0]), len(ds[1][0]))
    assert batch["input_ids"].shape == (2, longest)
    row = 0 if len(ds[0][0]) == short else 1
    assert (batch["input_ids"][row, short:] == PAD).all() and batch["input_values"][row, short:].isnan().all()


def test_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_meta(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        load_meta(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DatasetError, match="format 'something-else'"):
        load_meta(tmp_path / "other")
    with pytest.raises(DatasetError, match="start with bos"):
        write_dataset(tmp_path / "bad", {"train": [(np.array([5, EOS]), np.array([np.nan, np.nan]))]}, VOCAB)


# -- training ------------------------------------------------------------------------------------


def test_train_exports_loadable_safetensors_model(dataset, tmp_path):
    out = tmp_path / "model"
    summary = train(quick(dataset, out))
    assert summary["step"] == 6
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "README.md", "train_log.csv"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert not (out / "checkpoints").exists()
    model = AutoModel.from_pretrained(out)
    assert model.config.vocab_hash == VOCAB["vocab_hash"]
    card = (out / "README.md").read_text()
    assert str(dataset) in card and "Best validation loss: loss" in card and "Stability classes: `ehull:low` below" in card
    rows = log_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2]["val_loss"] and float(rows[-1]["tokens_per_s"]) > 0
    # The loss parts are logged, and training lowers the loss.
    assert all(rows[0][k] for k in ("token_loss", "coord_loss", "length_loss", "angle_loss"))
    assert float(rows[5]["val_loss"]) < float(rows[2]["val_loss"])


def test_resumed_run_matches_uninterrupted(dataset, tmp_path):
    # Dropout on, so the dropout RNG state must be restored too; 8 steps cross an epoch boundary.
    kw = dict(max_steps=12, save_every=4, eval_every=4, model_overrides={"dropout": 0.1}, keep_checkpoints=True)
    train(quick(dataset, tmp_path / "a", **kw))
    assert train(quick(dataset, tmp_path / "b", stop_at_step=6, **kw))["exported"] is None
    assert (tmp_path / "b" / "checkpoints" / "step-00000006").is_dir()
    train(quick(dataset, tmp_path / "b", resume=True, **kw))
    a, b = log_rows(tmp_path / "a"), log_rows(tmp_path / "b")
    assert [r["step"] for r in b] == [str(s) for s in range(1, 13)]
    for ra, rb in zip(a, b):
        for key in ("loss", "token_loss", "coord_loss", "val_loss", "lr"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_finish_exports_an_interrupted_run_where_it_stands(dataset, tmp_path):
    """A schedule longer than the time at hand: --resume --finish exports the best validated weights
    so far, takes no further step, and the card says where the run ended."""
    out, kw = tmp_path / "f", dict(max_steps=12, eval_every=3)
    train(quick(dataset, out, stop_at_step=6, **kw))
    summary = train(quick(dataset, out, resume=True, finish=True, **kw))
    assert summary["step"] == 6 and summary["stop_reason"] == "ended at step 6 of 12 on request (finish)"
    assert max(int(r["step"]) for r in log_rows(out)) == 6
    card = (out / "README.md").read_text()
    assert "ended at step 6 of 12" in card
    last_logged = [r for r in log_rows(out) if r["loss"]][-1]
    assert summary["train"]["loss"] == pytest.approx(float(last_logged["loss"]))  # the card's training loss
    assert "Final training loss (last logging window): n/a" not in card
    assert summary["exported"].startswith("best validation checkpoint")
    assert AutoModel.from_pretrained(str(out)).config.vocab_hash == VOCAB["vocab_hash"]
    with pytest.raises(TrainingError, match="pass it with resume"):
        train(quick(dataset, tmp_path / "g", finish=True, **kw))
    with pytest.raises(TrainingError, match="nothing to finish"):
        train(quick(dataset, tmp_path / "h", resume=True, finish=True, **kw))


def test_grad_accumulation_normalises_by_target_tokens(dataset, tmp_path):
    """Two micro-batches of 8 with accumulation give the same step as one batch of 16: the loss is
    divided by the tokens of the whole step, not averaged over micro-batch means."""
    one = train(quick(dataset, tmp_path / "one", batch_size=16, max_steps=2, eval_every=0))
    two = train(quick(dataset, tmp_path / "two", batch_size=8, grad_accum_steps=2, max_steps=2, eval_every=0))
    a, b = log_rows(tmp_path / "one"), log_rows(tmp_path / "two")
    for ra, rb in zip(a, b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-5)
    wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    assert one["step"] == two["step"] == 2


def test_length_sorted_pieces_change_only_the_padding_not_the_step(dataset, tmp_path):
    """A batch of 16 run as 4 pieces of similar length makes the same optimizer steps as run whole."""
    whole = train(quick(dataset, tmp_path / "whole", batch_size=16, max_steps=3, eval_every=0, length_sorted_pieces=1))
    split = train(quick(dataset, tmp_path / "split", batch_size=16, max_steps=3, eval_every=0, length_sorted_pieces=4))
    assert whole["step"] == split["step"] == 3
    for ra, rb in zip(log_rows(tmp_path / "whole"), log_rows(tmp_path / "split")):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-5)
    wa = load_file(str(tmp_path / "whole" / "model.safetensors"))
    wb = load_file(str(tmp_path / "split" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    recorded = json.loads((tmp_path / "split" / "training_summary.json").read_text())["train_config"]
    assert recorded["length_sorted_pieces"] == 4


def test_length_sorted_pieces_keep_every_sequence_and_cut_padding():
    from wyckoffgpt.training import _length_sorted_pieces

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 120, size=500)
    idx = rng.permutation(500)[:128]
    pieces = _length_sorted_pieces(idx, lengths, 4)
    assert len(pieces) == 4 and sorted(np.concatenate(pieces).tolist()) == sorted(idx.tolist())
    padded = sum(len(p) * lengths[p].max() for p in pieces)
    assert padded < 0.7 * len(idx) * lengths[idx].max()
    assert [len(p) for p in _length_sorted_pieces(idx[:3], lengths, 4)] == [1, 1, 1]


def test_bf16_mixed_precision_trains_on_cpu(dataset, tmp_path):
    summary = train(quick(dataset, tmp_path / "bf16", mixed_precision="bf16", max_steps=8, eval_every=4))
    rows = log_rows(tmp_path / "bf16")
    losses = [float(r["loss"]) for r in rows]
    assert all(np.isfinite(losses))
    assert float(rows[7]["val_loss"]) < float(rows[3]["val_loss"])
    assert np.isfinite(summary["best_val"])
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights stay fp32


def test_early_stopping(dataset, tmp_path):
    # min_delta so large that no evaluation counts as an improvement after the first.
    summary = train(quick(dataset, tmp_path / "es", max_steps=20, eval_every=1, patience=2, min_delta=1e9))
    assert summary["step"] == 3
    assert summary["stop_reason"].startswith("early stopping")


# -- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_one_clear_error(dataset, tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        train(quick(tmp_path / "nope", tmp_path / "o1"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="is empty"):
        train(quick(tmp_path / "empty", tmp_path / "o2"))
    with pytest.raises(TrainingError, match="unknown model preset 'huge'"):
        train(quick(dataset, tmp_path / "o3", model_preset="huge"))
    with pytest.raises(TrainingError, match="fewer than one optimizer step"):
        train(quick(dataset, tmp_path / "o4", batch_size=1000))

    # Vocabulary mismatch: a model trained on another vocabulary.
    other = tmp_path / "other-data"
    write_dataset(other, {"train": make_sequences(16, 1)}, {**VOCAB, "vocab_hash": "another-vocab"})
    train(quick(other, tmp_path / "other-model", max_steps=1, eval_every=0))
    with pytest.raises(TrainingError, match="vocabulary mismatch.*another-vocab.*synthetic-v1"):
        train(quick(dataset, tmp_path / "o5", init_from=str(tmp_path / "other-model")))


def test_corrupt_checkpoint_is_reported(dataset, tmp_path):
    out = tmp_path / "c"
    train(quick(dataset, out, max_steps=6, stop_at_step=3))
    ckpt = out / "checkpoints" / "step-00000003"
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TrainingError, match="checkpoint .*step-00000003 is corrupt"):
        train(quick(dataset, out, max_steps=6, resume=True))
    (ckpt / "trainer_state.json").write_text("{broken")
    with pytest.raises(TrainingError, match="corrupt"):
        train(quick(dataset, out, max_steps=6, resume=True))
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(quick(dataset, out, max_steps=6))


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout.strip() == "processes: 1"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0]


def test_training_and_model_loading_need_no_structure_libraries(tmp_path):
    # A GPU box or a training job needs torch and transformers only; pymatgen/spglib come with generation.
    # A model that reads the charge feature too (SMACT, so pymatgen's Composition, once it computes
    # one), and the tokenizer files a trained model is exported with.
    code = ("import sys, wyckoffgpt, wyckoffgpt.training\n"
            "from wyckoffgpt.configuration_wyckoffgpt import WyckoffGPTConfig\n"
            "from wyckoffgpt.training import _export_tokenizer, input_features\n"
            "from wyckoffgpt.vocab import default_vocab\n"
            "from wyckoffgpt.composition import feature_function\n"
            "vocab = default_vocab()\n"
            "feature_function(vocab, 8)\n"
            "config = WyckoffGPTConfig(composition_slots=8, charge_feature=True, **vocab.model_fields())\n"
            "assert input_features(config, vocab.hash) is not None\n"
            f"_export_tokenizer(__import__('pathlib').Path({str(tmp_path)!r}), vocab.hash)\n"
            "print(sorted(m for m in ('pymatgen', 'spglib', 'pyxtal', 'smact') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert {"tokenizer.json", "wyckoff_tables.json"} <= {p.name for p in tmp_path.iterdir()}


def test_epoch_batches_cover_each_sequence_once_and_group_lengths():
    from wyckoffgpt.training import EpochBatches

    lengths = np.random.default_rng(0).integers(10, 120, size=1000)
    seen = []
    for rank in range(2):
        eb = EpochBatches(lengths, batch_size=8, accum=2, world=2, rank=rank, seed=0)
        assert eb.steps_per_epoch == 1000 // 32
        for step in range(eb.steps_per_epoch):
            seen += [i for micro in eb.step_indices(3, step) for i in micro]
    assert len(seen) == len(set(seen)) == 31 * 32  # every used sequence once, across processes
    eb = EpochBatches(lengths, batch_size=8, accum=1, world=1, rank=0, seed=0)
    padded = sum(lengths[b].max() * len(b) for step in eb.epoch(0) for b in step)
    shuffled = EpochBatches(lengths, batch_size=8, accum=1, world=1, rank=0, seed=0, bucket=False)
    padded_plain = sum(lengths[b].max() * len(b) for step in shuffled.epoch(0) for b in step)
    assert padded < 0.7 * padded_plain
    assert not np.array_equal(eb.epoch(0), eb.epoch(1))  # reshuffled every epoch


def test_short_and_long_crystals_weigh_the_same_per_token(tmp_path):
    """Half the sequences are short and start with token 3, half are long and start with 4. If a
    short sequence's tokens weighed more than a long one's (a loss averaged per sequence, or per
    length-grouped step), the model would learn to start with 3 more often than the data do. The
    tolerance is the spread of this 120-step tiny run over thread counts (0.49-0.55 on 2 or 1 CPU
    threads); length-bucketed steps, the old default, reach 0.92."""
    from synthetic_data import ANGLES, COORDS, LENGTHS

    from wyckoffgpt import WyckoffGPTModel

    def sequence(long: bool, rng) -> tuple[np.ndarray, np.ndarray]:
        ids = [BOS, 4 if long else 3, 20, 40] + ([50 + 2, COORDS[0], COORDS[1]] * 6 if long else [50])
        ids += LENGTHS + ANGLES + [EOS]
        vals = [np.nan if t not in COORDS + LENGTHS + ANGLES else 0.3 + 0.01 * rng.normal() for t in ids]
        return np.array(ids, dtype=np.int64), np.array(vals, dtype=np.float32)

    rng = np.random.default_rng(0)
    train_seqs = [sequence(i % 2 == 1, rng) for i in range(256)]
    data = tmp_path / "data"
    write_dataset(data, {"train": train_seqs, "val": train_seqs[:16]}, VOCAB)
    train(quick(data, tmp_path / "run", batch_size=32, max_steps=120, eval_every=0, log_every=40, max_lr=3e-3))
    model = WyckoffGPTModel.from_pretrained(tmp_path / "run")
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([[BOS]])).logits[0, -1], -1)
    assert float(p[3] / (p[3] + p[4])) == pytest.approx(0.5, abs=0.1)


# -- the loss record ------------------------------------------------------------------------------


def test_logged_losses_are_per_token_over_the_whole_window(dataset):
    """Sums of two half batches give the whole batch's per-token losses (not a mean of two means)."""
    from wyckoffgpt import WyckoffGPTConfig, WyckoffGPTModel
    from wyckoffgpt.training import LossSums

    torch.manual_seed(0)
    model = WyckoffGPTModel(WyckoffGPTConfig.from_preset("tiny", **VOCAB)).eval()
    ds = SequenceDataset(dataset, "train")
    rows = [ds[i] for i in range(8)]
    with torch.no_grad():
        whole = LossSums.of(model(**collate(rows, PAD), compute_loss=True))
        halves = [LossSums.of(model(**collate(part, PAD), compute_loss=True)) for part in (rows[:3], rows[3:])]
    summed = (LossSums.zeros() + halves[0] + halves[1]).means()
    assert summed == pytest.approx(whole.means(), rel=1e-5)
    assert summed["loss"] == pytest.approx(float(whole.loss / whole.tokens), rel=1e-6)
    assert float(whole.tokens) == sum(len(ids) - 1 for ids, _ in rows)


# -- stability dropout ----------------------------------------------------------------------------


def _stability_dataset(path: Path, n: int) -> tuple[Path, dict[str, int]]:
    """Rows of the real vocabulary, each stating a stability (ehull:low or ehull:high)."""
    from wyckoffgpt.vocab import STABILITY_TOKENS, default_vocab

    vocab = default_vocab()
    ids = {level: vocab.token_to_id[token] for level, token in STABILITY_TOKENS.items()}
    t = vocab.token_to_id
    rows = []
    for i in range(n):
        seq = [t["<bos>"], ids["low" if i % 2 else "high"], t["n:1"], t["Na" if i % 3 else "Cl"], t["sg:225"], t["<eos>"]]
        rows.append((np.array(seq), np.full(len(seq), np.nan, dtype=np.float32)))
    write_dataset(path, {"train": rows}, vocab.model_fields())
    return path, ids


def _drawn_rows(monkeypatch, cfg: TrainConfig) -> torch.Tensor:
    """Every training row train() collates, in order."""
    import wyckoffgpt.training as training

    drawn = []

    def recording_collate(batch, *args, **kwargs):
        drawn.extend(ids for ids, _ in batch)
        return collate(batch, *args, **kwargs)

    monkeypatch.setattr(training, "collate", recording_collate)
    train(cfg)
    return torch.stack(drawn)


def test_stability_dropout_replaces_the_stability_token_at_its_rate(tmp_path, monkeypatch):
    data, ids = _stability_dataset(tmp_path / "data", 128)
    run = dict(batch_size=32, max_steps=16, eval_every=0, log_every=8)  # 4 epochs, 512 rows drawn
    drawn = _drawn_rows(monkeypatch, quick(data, tmp_path / "p", stability_dropout=0.3, **run))
    assert drawn.shape == (512, 6)
    unknown = drawn[:, 1] == ids[None]
    assert unknown.float().mean().item() == pytest.approx(0.3, abs=0.06)
    # Only the stability token changes, and the others stay as the data state them.
    assert set(drawn[~unknown, 1].tolist()) == {ids["low"], ids["high"]}
    assert (drawn[:, 2:] != ids[None]).all()
    # Seeded: the same run draws the same rows; the default draws every row as it is.
    again = _drawn_rows(monkeypatch, quick(data, tmp_path / "p2", stability_dropout=0.3, **run))
    assert torch.equal(drawn, again)
    plain = _drawn_rows(monkeypatch, quick(data, tmp_path / "off", **run))
    assert not (plain[:, 1] == ids[None]).any()


def test_stability_dropout_draws_each_row_anew_each_epoch_whatever_the_layout():
    from wyckoffgpt.training import StabilityDropout

    a = StabilityDropout(0.25, seed=0, n_rows=20_000, known_ids=[13, 14], unknown_id=15)
    b = StabilityDropout(0.25, seed=0, n_rows=20_000, known_ids=[13, 14], unknown_id=15)
    assert a.dropped(0).mean() == pytest.approx(0.25, abs=0.01)
    assert np.array_equal(a.dropped(3), b.dropped(3))  # a function of (seed, epoch, row): resume-safe
    assert not np.array_equal(a.dropped(0), a.dropped(1))
    row = (torch.tensor([1, 13, 20, 2]), torch.full((4,), float("nan")))
    i = int(np.flatnonzero(a.dropped(0))[0])
    assert a.apply(0, i, row)[0].tolist() == [1, 15, 20, 2]
    j = int(np.flatnonzero(~a.dropped(0))[0])
    assert a.apply(0, j, row)[0] is row[0]


def test_stability_dropout_needs_the_vocabulary(dataset, tmp_path):
    with pytest.raises(TrainingError, match="stability_dropout needs the vocabulary"):
        train(quick(dataset, tmp_path / "o", stability_dropout=0.1))
    with pytest.raises(TrainingError, match=r"stability_dropout must be in \[0, 1\]"):
        train(quick(dataset, tmp_path / "o", stability_dropout=1.5))


def test_element_features_give_the_model_each_element_s_properties(tmp_path):
    from wyckoffgpt.chemistry import ELEMENT_PROPERTIES
    from wyckoffgpt.vocab import default_vocab

    data, _ = _stability_dataset(tmp_path / "data", 32)
    train(quick(data, tmp_path / "m", element_features=True, eval_every=0))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    vocab = default_vocab()
    assert sorted(config["element_token_ids"]) == sorted(vocab.element_ids.values())
    assert {len(row) for row in config["element_properties"]} == {len(ELEMENT_PROPERTIES)}
    row = {s: config["element_properties"][config["element_token_ids"].index(vocab.element_ids[s])]
           for s in ("Na", "K", "Cl")}
    # The chemistry is the real one: chlorine is more electronegative than sodium, and sodium's
    # properties are nearer potassium's than chlorine's.
    x = ELEMENT_PROPERTIES.index("electronegativity")
    assert row["Cl"][x] > row["Na"][x]
    assert np.linalg.norm(np.subtract(row["Na"], row["K"])) < np.linalg.norm(np.subtract(row["Na"], row["Cl"]))
    # The exported model reads them back and uses them.
    model = AutoModel.from_pretrained(tmp_path / "m").eval()
    assert model.element_embedding is not None and model.element_embedding.weight.abs().sum() > 0


def test_element_features_need_the_vocabulary(dataset, tmp_path):
    with pytest.raises(TrainingError, match="element_features needs the installed vocabulary"):
        train(quick(dataset, tmp_path / "o", element_features=True))


# -- the command line -----------------------------------------------------------------------------


def test_train_help_lists_every_config_field(capsys):
    from dataclasses import fields

    from scripts import load_script

    with pytest.raises(SystemExit) as exit_info:
        load_script("train.py").main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert f.metadata["help"] and " ".join(f.metadata["help"].split()[:4]) in text, f.name


def test_every_setting_is_settable_from_flags_over_the_yaml(tmp_path):
    from scripts import load_script

    from wyckoffgpt.training import train_config_from_dict

    cli = load_script("train.py")
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\ngrad_clip: 0.5\nweight_decay: 0.01\n")
    args = cli.parse_args(["--config", str(config), "--data", "d", "--out", "o", "--grad-clip", "2",
                           "--warmup-frac", "0.1", "--length-buckets", "--betas", "0.8", "0.95",
                           "--model-overrides", '{"dropout": 0.1}', "--no-progress", "--stability-dropout", "0.2",
                           "--lr", "3e-4"])  # fmt: skip
    cfg = train_config_from_dict(cli.settings(args))
    assert (cfg.data_dir, cfg.out_dir, cfg.epochs, cfg.weight_decay) == ("d", "o", 3, 0.01)  # from the YAML
    assert (cfg.grad_clip, cfg.warmup_frac, cfg.length_buckets, cfg.betas) == (2.0, 0.1, True, (0.8, 0.95))
    assert (cfg.model_overrides, cfg.progress, cfg.stability_dropout, cfg.max_lr) == ({"dropout": 0.1}, False, 0.2, 3e-4)
    assert cfg.seed == TrainConfig("d", "o").seed and cfg.command.startswith("python ")
