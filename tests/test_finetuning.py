"""Fine-tuning (`TrainConfig.init_from` / `train.py --init-from`): starting weights, defaults, frozen
blocks, vocabulary check, model card, and the model sources (folder, bundled, Hub cache)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic_data import PAD, write_synthetic_dataset

from wyckoffgpt.data import SequenceDataset, collate
from wyckoffgpt.modeling_wyckoffgpt import WyckoffGPTModel
from wyckoffgpt.training import (
    FINETUNE_DEFAULTS,
    SCRATCH_DEFAULTS,
    TrainConfig,
    TrainingError,
    describe_base_model,
    train,
    with_defaults,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", n_train=64, n_val=16, seed=0)


@pytest.fixture(scope="module")
def base(dataset, tmp_path_factory) -> Path:
    """A tiny trained model: the one the tests fine-tune."""
    out = tmp_path_factory.mktemp("base") / "model"
    train(quick(dataset, out, max_steps=8))
    return out


def quick(data: Path, out: Path, **kw) -> TrainConfig:
    defaults = dict(model_preset="tiny", batch_size=8, max_steps=6, eval_every=3, log_every=1, save_every=0, progress=False)
    return TrainConfig(data_dir=str(data), out_dir=str(out), **{**defaults, **kw})


def first_logged_loss(out: Path) -> float:
    with (out / "train_log.csv").open() as f:
        return float(next(csv.DictReader(f))["loss"])


def loss_on_train_split(model_dir: Path, data: Path) -> float:
    model = WyckoffGPTModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ds = SequenceDataset(data, "train")
    with torch.no_grad():
        out = model(**collate([ds[i] for i in range(len(ds))], PAD), compute_loss=True)
    return float(out.loss_sum / out.n_tokens)


def test_fine_tuning_starts_from_the_saved_weights(dataset, base, tmp_path):
    # One step over the whole train split: the logged loss is computed before the update, so it is the
    # base model's loss on this data, and a model starting from random weights has another one.
    one_step = dict(batch_size=64, max_steps=1, eval_every=0, length_sorted_pieces=1)
    train(quick(dataset, tmp_path / "ft", init_from=str(base), **one_step))
    expected = loss_on_train_split(base, dataset)
    assert first_logged_loss(tmp_path / "ft") == pytest.approx(expected, rel=1e-4)
    train(quick(dataset, tmp_path / "scratch", **one_step))
    assert first_logged_loss(tmp_path / "scratch") != pytest.approx(expected, rel=1e-2)


def test_fine_tuning_defaults_apply_only_to_unset_settings(dataset, base, tmp_path):
    scratch = with_defaults(TrainConfig(data_dir="d", out_dir="o"))
    assert {k: getattr(scratch, k) for k in SCRATCH_DEFAULTS} == SCRATCH_DEFAULTS
    tuned = with_defaults(TrainConfig(data_dir="d", out_dir="o", init_from="m"))
    assert {k: getattr(tuned, k) for k in FINETUNE_DEFAULTS} == FINETUNE_DEFAULTS
    assert tuned.max_lr < 1e-3 and tuned.warmup_frac < scratch.warmup_frac  # lower peak, shorter warm-up
    assert with_defaults(TrainConfig(data_dir="d", out_dir="o", init_from="m", max_lr=3e-4)).max_lr == 3e-4
    # The settings in force are recorded with the model.
    train(quick(dataset, tmp_path / "ft", init_from=str(base), eval_every=None, patience=None, max_steps=2))
    recorded = json.loads((tmp_path / "ft" / "training_summary.json").read_text())["train_config"]
    assert {k: recorded[k] for k in FINETUNE_DEFAULTS} == FINETUNE_DEFAULTS


def test_freeze_blocks_leaves_embeddings_and_first_blocks_unchanged(dataset, base, tmp_path):
    train(quick(dataset, tmp_path / "ft", init_from=str(base), freeze_blocks=1, eval_every=0, max_lr=1e-2))
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(tmp_path / "ft" / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("wte.", "value_embedding.", "wpe.", "blocks.0."))]
    trained = [k for k in before if k.startswith(("blocks.1.", "value_head."))]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    with pytest.raises(TrainingError, match="freeze_blocks 3 is more than the model's 2 blocks"):
        train(quick(dataset, tmp_path / "too-many", init_from=str(base), freeze_blocks=3))
    with pytest.raises(TrainingError, match="freeze_blocks needs init_from"):
        train(quick(dataset, tmp_path / "scratch", freeze_blocks=1))


def test_model_card_names_the_base_model_and_the_data(dataset, base, tmp_path):
    train(quick(dataset, tmp_path / "ft", init_from=str(base), max_steps=2))
    card = (tmp_path / "ft" / "README.md").read_text()
    assert f"Fine-tuned from the model folder `{base}`, on the data `{dataset}`" in card
    assert "64 training / 16 validation" in card
    assert "base_model:" not in card  # Hub metadata only for a Hub model
    assert "wyckoffgpt-mp-small" in describe_base_model("bundled")


def test_vocabulary_mismatch_is_one_line_exit_2_and_writes_nothing(dataset, tmp_path):
    # The bundled model's vocabulary is the real one, not the synthetic data's.
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--data", str(dataset), "--out", str(out),
                           "--init-from", "bundled", "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: vocabulary mismatch") and "synthetic-v1" in lines[0]
    assert not out.exists()
    with pytest.raises(TrainingError, match="--init-from: model folder .*missing does not exist"):
        train(quick(dataset, tmp_path / "o2", init_from=str(tmp_path / "missing")))


def test_hub_repo_id_is_read_from_the_local_cache(dataset, base, tmp_path):
    # A Hub cache laid out as huggingface_hub writes it; offline, so nothing can be downloaded.
    repo = tmp_path / "hub" / "models--someone--tiny-crystals"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(base, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "ft"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--data", str(dataset), "--out", str(out),
                           "--init-from", "someone/tiny-crystals", "--model-preset", "tiny", "--batch-size", "8",
                           "--max-steps", "2", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    card = (out / "README.md").read_text()
    assert "base_model: someone/tiny-crystals" in card and "Hugging Face Hub model `someone/tiny-crystals`" in card

