"""The running-composition input: same features in training and sampling, a zero start on trained
weights, and a model that reads it trains, saves, loads and samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from random_model import save_random_model

from wyckoffgpt import CrystalGenerator, CrystalSequence, WyckoffGPTConfig, WyckoffGPTModel
from wyckoffgpt.composition import feature_function, parser_features, sequence_features
from wyckoffgpt.data import collate, write_dataset
from wyckoffgpt.grammar import Limits, SequenceParser
from wyckoffgpt.sampling import Sampler
from wyckoffgpt.training import TrainConfig, train
from wyckoffgpt.vocab import default_vocab

VOCAB = default_vocab()


@pytest.fixture(scope="module")
def sequences(slice_records, tokenizer) -> list[CrystalSequence]:
    return [tokenizer.encode(s, r.e_above_hull) for r, s in slice_records[:60]]


def test_features_count_atoms_per_declared_element():
    seq = CrystalSequence.from_string(
        f"<bos> ehull:low n:2 Na Cl sg:225 {VOCAB.group(225).by_letter['a'].orbit} Na "
        f"{VOCAB.group(225).by_letter['b'].orbit} Cl a=5.64 <eos>")
    f = sequence_features(VOCAB, seq.ids, slots=8)
    assert f.shape == (len(seq), 18)
    assert not f[:7].any()  # nothing placed before the first site's element
    assert f[7, :2].tolist() == [1.0, 0.0]  # 4 Na: all of the cell so far
    assert f[9, :2].tolist() == [0.5, 0.5]  # then 4 Cl
    assert f[9, 16] == pytest.approx(np.log1p(8) / np.log(256)) and f[9, 17] == pytest.approx(2 / 20)


def test_charge_column_says_whether_the_atoms_placed_so_far_are_balanced():
    from wyckoffgpt.chemistry import smact_valid

    a, b_, c = (VOCAB.group(225).by_letter[x].orbit for x in "abc")  # Fm-3m: 4a, 4b, 8c
    # Site by site: Cl4 alone (an element: SMACT passes it), Na4Cl4, then Na4Cl12, not balanced.
    seq = CrystalSequence.from_string(f"<bos> ehull:low n:2 Na Cl sg:225 {a} Cl {b_} Na {c} Cl a=5.6 <eos>")
    f = sequence_features(VOCAB, seq.ids, slots=8, charge=True)
    assert f.shape == (len(seq), 19)
    assert np.array_equal(f[:, :18], sequence_features(VOCAB, seq.ids, slots=8))
    site_ends = [i for i, t in enumerate(seq.tokens) if i > 4 and t in ("Na", "Cl")]
    expected = [float(smact_valid(x)) for x in ("Cl", "NaCl", "NaCl3")]
    assert expected[1:] == [1.0, 0.0] and f[site_ends, 18].tolist() == expected


@pytest.mark.parametrize("charge", [False, True])
def test_sampling_features_equal_training_features(sequences, charge):
    for seq in sequences:
        parser = SequenceParser(VOCAB)
        rows = []
        for t, v in zip(seq.ids.tolist(), seq.values.tolist()):
            parser.feed(t, v)
            rows.append(parser_features(parser, 8, charge))
        assert np.array_equal(np.stack(rows), sequence_features(VOCAB, seq.ids, 8, charge)), str(seq)


def test_charge_feature_needs_the_composition():
    with pytest.raises(ValueError, match="composition_slots"):
        WyckoffGPTConfig(charge_feature=True)


def test_new_input_starts_at_zero_on_trained_weights(tmp_path, sequences):
    folder = save_random_model(tmp_path / "plain")
    plain = WyckoffGPTModel.from_pretrained(folder).eval()
    config = WyckoffGPTConfig.from_pretrained(folder)
    config.update({"composition_slots": 8})
    reading = WyckoffGPTModel.from_pretrained(folder, config=config).eval()
    batch = collate([(torch.from_numpy(s.ids), torch.from_numpy(s.values.astype(np.float32))) for s in sequences[:8]],
                    VOCAB.pad_id, feature_function(VOCAB, 8))
    with torch.no_grad():
        assert torch.equal(plain(batch["input_ids"], batch["input_values"]).logits, reading(**batch).logits)
        with pytest.raises(ValueError, match="composition"):
            reading(batch["input_ids"], batch["input_values"])


@pytest.mark.parametrize("charge", [False, True])
def test_model_reading_composition_trains_and_samples(tmp_path, sequences, charge):
    rows = [(s.ids, s.values.astype(np.float32)) for s in sequences]
    write_dataset(tmp_path / "data", {"train": rows[:48], "val": rows[48:]}, VOCAB.model_fields())
    save_random_model(tmp_path / "plain")
    out = tmp_path / "model"
    summary = train(TrainConfig(data_dir=str(tmp_path / "data"), out_dir=str(out), init_from=str(tmp_path / "plain"),
                                model_overrides={"composition_slots": 8, "charge_feature": charge},
                                model_preset="tiny", batch_size=8,
                                max_steps=6, eval_every=3, save_every=0, progress=False))
    assert summary["step"] == 6
    model = WyckoffGPTModel.from_pretrained(out)
    assert model.config.composition_slots == 8 and model.composition_embedding.weight.abs().sum() > 0
    assert (model.charge_embedding is not None) == charge

    torch.set_num_threads(1)
    gen = CrystalGenerator.from_pretrained(out, device="cpu")
    results = gen.generate(16, seed=0, batch_size=8, check_unique=False)
    assert all(r.structure is not None for r in results)
    # Left-padded retry rounds with the cache give what full recomputation gives.
    runs = []
    for use_cache in (True, False):
        parsers = [SequenceParser(VOCAB, Limits(6, 40)) for _ in range(8)]
        runs.append(Sampler(gen.model, use_cache=use_cache, max_retries=2, charge_check="off").sample(
            parsers, generator=torch.Generator().manual_seed(1)))
    assert runs[0].retries == runs[1].retries
    assert all(np.array_equal(a, b) for a, b in zip(runs[0].ids, runs[1].ids))
