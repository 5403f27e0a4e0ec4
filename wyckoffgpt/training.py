"""Training loop for WyckoffGPT on a tokenized dataset folder (see `wyckoffgpt.data`).

A plain accelerate loop: one process per device (or several CPU processes forming one gloo group),
data order derived from (seed, epoch) so that a resumed run reads exactly the batches an uninterrupted
run would, and the summed loss of each optimizer step (all micro-batches, all processes) divided by
one constant, the mean number of target tokens per step.

Output folder layout while training: `checkpoints/step-NNNNNNNN/` (accelerate state + our
trainer_state.json), `best/` (weights of the best validation loss), `train_log.csv`. At the end the
model is exported into the folder itself (config, model.safetensors, code, tokenizer, README.md) and
the checkpoints, which hold pickled optimizer states, are removed unless asked to keep them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import time
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .atomic import atomic_write
from .composition import feature_function
from .configuration_wyckoffgpt import PRESETS, WyckoffGPTConfig
from .data import VOCAB_FIELDS, DatasetError, SequenceDataset, collate, load_meta
from .model_folder import BUNDLED_INIT, TRAINING_SUMMARY
from .modeling_wyckoffgpt import WyckoffGPTModel
from .vocab import STABILITY_TOKENS, default_vocab

STATE_FILE = "trainer_state.json"
CSV_COLUMNS = [
    "step", "epoch", "lr", "loss", "token_loss", "coord_loss", "length_loss", "angle_loss",
    "val_loss", "val_token_loss", "val_coord_loss", "val_length_loss", "val_angle_loss",
    "tokens_per_s", "elapsed_s",
]  # fmt: skip


class TrainingError(RuntimeError):
    """Bad training input (dataset, vocabulary, checkpoint, preset, settings); the message says which."""


def _setting(default: Any = MISSING, help: str = "", flags: tuple[str, ...] = (), choices: tuple[str, ...] = (),
             default_factory: Any = MISSING) -> Any:
    """A TrainConfig field with its documentation (`help`, shown by `train.py --help` with the default),
    any short command-line `flags` besides the generated --field-name, and its `choices` if it has a few."""
    metadata = {"help": help, "flags": flags, "choices": choices}
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class TrainConfig:
    """Settings of a training run. Each field's help text says what it means, in which unit, and what
    None stands for; `train.py --help` prints them with their defaults (a YAML file of these keys sets
    them too)."""

    data_dir: str | os.PathLike = _setting(help="tokenized dataset folder (meta.json + arrays)", flags=("--data",))
    out_dir: str | os.PathLike = _setting(
        help="output folder for checkpoints, logs and the final model", flags=("--out",))
    model_preset: str = _setting("small", f"architecture preset, with its training defaults: {' | '.join(PRESETS)}")
    model_overrides: dict[str, Any] = _setting(
        help="any WyckoffGPTConfig field, over the preset (or over the --init-from model's config), as a JSON "
             "object, e.g. '{\"dropout\": 0.1}'", default_factory=dict)
    init_from: str | None = _setting(
        None, "start from a trained model instead of random weights: a saved model folder, a Hub repo id (read "
              "from the Hugging Face cache, fetched once if absent), or 'bundled' for the model that ships with "
              "the package (a folder of that name: ./bundled). Fine-tuning: the settings left None then take "
              "FINETUNE_DEFAULTS instead of the from-scratch defaults")
    freeze_blocks: int = _setting(
        0, "fine-tuning only: freeze the token/value/position/composition input embeddings and the first K "
           "transformer blocks (0: train everything). The token head shares its weight with the token "
           "embedding, so that weight stays frozen too; the value head, the later blocks and the final "
           "LayerNorm train")
    batch_size: int | None = _setting(None, "sequences per micro-batch and process; None: the preset's")
    grad_accum_steps: int = _setting(1, "micro-batches per optimizer step and process", flags=("--grad-accum",))
    epochs: int = _setting(10, "passes over the train split (when max_steps is not set)")
    max_steps: int | None = _setting(None, "optimizer steps in all; overrides epochs when set")
    max_lr: float | None = _setting(
        None, "peak learning rate of the one-cycle schedule; None: the preset's (paper: 2e-4), fine-tuning: 3e-5",
        flags=("--lr",))
    warmup_frac: float | None = _setting(
        None, "one-cycle schedule: linear warm-up over this fraction of the steps, then linear decay; "
              "None: 0.05, fine-tuning: 0.02")
    final_lr_frac: float = _setting(0.01, "learning rate at the last step, as a fraction of max_lr")
    weight_decay: float | None = _setting(
        None, "AdamW weight decay of the weight matrices (biases, norms: none); None: the preset's")
    betas: tuple[float, float] = _setting((0.9, 0.999), "AdamW's two moment decay rates")
    grad_clip: float = _setting(1.0, "largest gradient norm of a step (clipped above it); 0: no clipping")
    # This model's gradient norm is always above grad_clip, so every step moves the weights as far; in
    # a step of only short crystals a short crystal's tokens then weigh more than a long one's, and a
    # model trained so over-samples small cells (the bundled model's card). Shuffled steps mix lengths, and every
    # token weighs the same.
    length_buckets: bool = _setting(
        False, "group sequences of similar length into a step: less padding, but short crystals' tokens then "
               "weigh more than long ones' (length_sorted_pieces cuts the padding without that bias)")
    # The step and its gradient stay the same (the loss is a sum divided by a constant), only the
    # padding shrinks. A GPU's steps are bound by per-kernel overhead rather than by padded arithmetic,
    # so there one piece is best.
    length_sorted_pieces: int | None = _setting(
        None, "run each micro-batch as this many pieces of similar length, sorted within the step (same "
              "gradient, less padding); None: 4 on a CPU, 1 on a GPU")
    mixed_precision: str = _setting("no", "no | fp16 | bf16 (fp16 needs a GPU)", choices=("no", "fp16", "bf16"))
    seed: int = _setting(0, "seed of the weights, the data order, dropout and stability_dropout")
    stability_dropout: float = _setting(
        0.0, "probability that a training row's stability token (ehull:low/high) is replaced by ehull:unknown, "
             "drawn anew each time the row is read, so that the model also learns the unconditional "
             "distribution for classifier-free guidance; 0 = off")
    element_features: bool = _setting(
        False, "give the model each element's properties (wyckoffgpt.chemistry.ELEMENT_PROPERTIES: group, period, "
               "electronegativity, radius, common oxidation states, block) beside its learned embedding "
               "(WyckoffGPTConfig.element_properties); over init_from, the new input starts at zero, so the model "
               "starts out as it was saved")
    eval_every: int | None = _setting(
        None, "optimizer steps between validations; 0: no validation. None: 200, fine-tuning: 50")
    eval_batch_size: int | None = _setting(None, "sequences per validation batch and process; None: 2 x batch_size")
    patience: int | None = _setting(
        None, "validations without improvement before stopping early; None: 10, fine-tuning: 3")
    min_delta: float = _setting(0.0, "smallest fall of the validation loss (nats per token) that counts as improvement")
    save_every: int = _setting(
        500, "optimizer steps between checkpoints; 0: only at the end of an interrupted run (stop_at_step)")
    keep_last_checkpoints: int = _setting(2, "checkpoints kept in out_dir/checkpoints (older ones are removed)")
    keep_checkpoints: bool = _setting(False, "keep checkpoints/ and best/ after the final export")
    resume: bool = _setting(False, "continue from the last checkpoint in out_dir")
    stop_at_step: int | None = _setting(
        None, "stop (with a checkpoint) after this step, keeping the full schedule; continue with resume")
    finish: bool = _setting(
        False, "with resume: end the interrupted run where it stands and export it (its best validated weights) "
               "without further steps, for a schedule longer than the time at hand; the model card records "
               "the step it ended at")
    log_every: int = _setting(20, "optimizer steps between log lines (train_log.csv and the console)")
    progress: bool = _setting(True, "show a progress bar")
    command: str | None = _setting(None, "the command recorded in the model card; None: train.py's command line")


# Training defaults that go with each model preset (configuration_wyckoffgpt.PRESETS; batch size in
# sequences per process and step). The small preset's are the bundled model's recipe (its card has the
# command and the losses).
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=32, max_lr=1e-3, weight_decay=1e-3),
    "small": dict(batch_size=128, max_lr=1e-3, weight_decay=0.1),
    "paper": dict(batch_size=256, max_lr=2e-4, weight_decay=1e-3),
}

# Settings in force when they are left None: training from scratch, and fine-tuning (init_from set).
# Fine-tuning starts from a model at a loss minimum. A fresh AdamW moves every weight by about the
# learning rate per step whatever its gradient, so the peak is 3x the bundled model's final rate (1e-5),
# not a fraction of its peak: at 1e-4 a single step already raised its validation loss (BENCHMARKS.md,
# Fine-tuning). The low peak makes a short warm-up enough, and frequent evaluation with little
# patience stops before a small dataset is over-fitted (the exported weights are the best validated).
SCRATCH_DEFAULTS: dict[str, Any] = {"warmup_frac": 0.05, "eval_every": 200, "patience": 10}
FINETUNE_DEFAULTS: dict[str, Any] = {"max_lr": 3e-5, "warmup_frac": 0.02, "eval_every": 50, "patience": 3}


def _fail(message: str) -> TrainingError:
    return TrainingError(message)


# The lowest value each numeric setting may take (every one of them also has a type to match).
_AT_LEAST: dict[str, float] = {
    "grad_accum_steps": 1, "epochs": 1, "batch_size": 1, "max_steps": 1, "length_sorted_pieces": 1,
    "eval_batch_size": 1, "patience": 1, "keep_last_checkpoints": 1, "log_every": 1, "stop_at_step": 1,
    "eval_every": 0, "save_every": 0, "seed": 0, "grad_clip": 0.0, "weight_decay": 0.0, "min_delta": 0.0,
    "freeze_blocks": 0,
}  # fmt: skip


def _matches(value: Any, hint: Any) -> bool:
    """isinstance for the annotations TrainConfig uses (unions, int, float, bool, str, dict, tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_matches, value, args))
    if origin is not None:
        return isinstance(value, origin)
    return hint is Any or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _validate(cfg: TrainConfig) -> None:
    """TrainingError naming the first setting of a wrong type or out of range."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not _matches(value, hints[f.name]):
            raise _fail(f"{f.name} must be {_type_name(hints[f.name])}, got {value!r}")
        if f.name in _AT_LEAST and value is not None and value < _AT_LEAST[f.name]:
            raise _fail(f"{f.name} must be >= {_AT_LEAST[f.name]}, got {value}")
    if cfg.max_lr is not None and not cfg.max_lr > 0:
        raise _fail(f"max_lr must be > 0, got {cfg.max_lr}")
    if cfg.warmup_frac is not None and not 0 <= cfg.warmup_frac < 1:
        raise _fail(f"warmup_frac must be in [0, 1), got {cfg.warmup_frac}")
    if not 0 <= cfg.stability_dropout <= 1:
        raise _fail(f"stability_dropout must be in [0, 1], got {cfg.stability_dropout}")
    if not 0 <= cfg.final_lr_frac <= 1:
        raise _fail(f"final_lr_frac must be in [0, 1], got {cfg.final_lr_frac}")
    if cfg.model_preset not in PRESETS:
        raise _fail(f"unknown model preset {cfg.model_preset!r}; valid presets: {', '.join(PRESETS)}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise _fail(f"mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.finish and not cfg.resume:
        raise _fail("finish ends an interrupted run: pass it with resume (--resume --finish)")
    if cfg.freeze_blocks and not cfg.init_from:
        raise _fail("freeze_blocks needs init_from (freezing randomly initialised weights teaches nothing)")
    unknown = set(cfg.model_overrides) - {f for f in WyckoffGPTConfig().to_dict()} - set(PRESETS["tiny"])
    if unknown:
        raise _fail(f"unknown model setting(s): {', '.join(sorted(unknown))}")
    _check_out_dir(Path(cfg.out_dir), cfg.resume)


def _check_out_dir(out: Path, resume: bool) -> None:
    """--out must be creatable, and must not hold an earlier run's model unless resuming it (its
    checkpoints are checked once they are read)."""
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir():
        raise _fail(f"cannot write to --out {out}: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise _fail(f"cannot write to --out {out}: {existing} is not writable")
    if not resume and (out / "model.safetensors").exists():
        raise _fail(f"{out} already holds a trained model; choose another --out (or --resume an interrupted run)")


def train_config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """TrainConfig from a mapping (e.g. a YAML file); unknown keys are an error."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise _fail(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    if "betas" in values:
        values = {**values, "betas": tuple(values["betas"])}
    return TrainConfig(**values)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once it holds trainer_state.json;
    it only gets its final name after that)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found)


def _save_checkpoint(acc: Accelerator, out: Path, state: dict[str, Any], config: WyckoffGPTConfig, keep: int) -> None:
    root = out / "checkpoints"
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".tmp-step-{state['step']:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))  # every rank writes its own RNG state
    acc.wait_for_everyone()
    if acc.is_main_process:
        config.to_json_file(str(tmp / "config.json"))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], WyckoffGPTConfig]:
    try:
        state = json.loads((path / STATE_FILE).read_text())
        config = WyckoffGPTConfig.from_json_file(str(path / "config.json"))
        for key in ("step", "epoch", "step_in_epoch", "best_val", "bad_evals"):
            state[key]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _fail(f"checkpoint {path} is corrupt: {type(e).__name__}: {e}") from None
    return state, config


# ----------------------------------------------------------------------------------------------------
# Batching: micro-batch j of an epoch's permutation belongs to process j % world.


class EpochBatches:
    """Deterministic batches of an epoch, a function of (seed, epoch) only, so a resumed run reads the
    same batches. With `bucket`, sequences of similar length are grouped (sorted within chunks of
    BUCKET_STEPS steps, then the steps shuffled), which cuts the padding of sequences of varied
    length (see TrainConfig.length_buckets for its cost). The tail that does not fill a whole step is dropped."""

    BUCKET_STEPS = 50

    def __init__(
        self, lengths: np.ndarray, batch_size: int, accum: int, world: int, rank: int, seed: int, bucket: bool = True
    ) -> None:
        self.lengths, self.bs, self.accum, self.world, self.rank, self.seed = lengths, batch_size, accum, world, rank, seed
        self.bucket = bucket
        self.micro_per_step = accum * world
        self.steps_per_epoch = len(lengths) // (batch_size * self.micro_per_step)
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch(self, epoch: int) -> np.ndarray:
        """(steps, micro-batches per step, batch size) sequence indices."""
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            per_step = self.micro_per_step * self.bs
            perm = rng.permutation(len(self.lengths))[: self.steps_per_epoch * per_step]
            if self.bucket:
                chunk = per_step * self.BUCKET_STEPS
                for lo in range(0, len(perm), chunk):
                    part = perm[lo : lo + chunk]
                    perm[lo : lo + chunk] = part[np.argsort(self.lengths[part], kind="stable")]
            steps = perm.reshape(self.steps_per_epoch, self.micro_per_step, self.bs)
            if self.bucket:
                steps = steps[rng.permutation(self.steps_per_epoch)]
            self._cache = (epoch, steps)
        return self._cache[1]

    def step_indices(self, epoch: int, step_in_epoch: int) -> list[np.ndarray]:
        """This process's micro-batches for one optimizer step: micro-batch j goes to process j % world."""
        step = self.epoch(epoch)[step_in_epoch]
        return [step[a * self.world + self.rank] for a in range(self.accum)]


def _length_sorted_pieces(idx: np.ndarray, lengths: np.ndarray, pieces: int) -> list[np.ndarray]:
    """A micro-batch's sequence indices split into up to `pieces` groups of similar length."""
    if pieces <= 1:
        return [idx]
    ordered = idx[np.argsort(lengths[idx], kind="stable")]
    return [part for part in np.array_split(ordered, min(pieces, len(ordered))) if len(part)]


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class LossSums:
    """Summed losses of some target tokens and the counts they are divided by: the loss and the token
    cross-entropy summed over `tokens` targets, each value part (negative log density, or squared error
    for an mse head) summed over its own count of values. Sums add up over micro-batches, steps and
    processes; `means` gives the per-target losses the log reports."""

    loss: torch.Tensor
    token: torch.Tensor
    coord: torch.Tensor
    length: torch.Tensor
    angle: torch.Tensor
    tokens: torch.Tensor
    coords: torch.Tensor
    lengths: torch.Tensor
    angles: torch.Tensor

    # The model output's field for each of ours, in field order.
    OUTPUT_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "loss_sum", "token_loss_sum", "coord_loss_sum", "length_loss_sum", "angle_loss_sum",
        "n_tokens", "n_coord", "n_length", "n_angle",
    )  # fmt: skip

    @classmethod
    def zeros(cls, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LossSums:
        return cls(*torch.zeros(len(cls.OUTPUT_FIELDS), device=device, dtype=dtype))

    @classmethod
    def of(cls, output: Any, dtype: torch.dtype = torch.float32) -> LossSums:
        """The sums of one forward pass run with `compute_loss=True`."""
        return cls(*(getattr(output, name).detach().to(dtype) for name in cls.OUTPUT_FIELDS))

    def values(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(*(a + b for a, b in zip(self.values(), other.values())))

    def to(self, device: torch.device | str) -> LossSums:
        return LossSums(*(v.to(device) for v in self.values()))

    def reduced(self, acc: Accelerator) -> LossSums:
        """Summed over all processes, in one collective."""
        return LossSums(*acc.reduce(torch.stack(self.values()), "sum"))

    def means(self) -> dict[str, float]:
        """Loss and token loss per target token, each value part per value (NaN where there is none)."""
        s = dict(zip((f.name for f in fields(self)), torch.stack(self.values()).double().tolist()))
        ratio = lambda part, count: s[part] / s[count] if s[count] else float("nan")  # noqa: E731
        n_tokens = max(s["tokens"], 1.0)
        return {"loss": s["loss"] / n_tokens, "token": s["token"] / n_tokens, "coord": ratio("coord", "coords"),
                "length": ratio("length", "lengths"), "angle": ratio("angle", "angles")}  # fmt: skip


class StabilityDropout:
    """Which training rows lose their stability token (TrainConfig.stability_dropout). Each row is drawn
    anew each epoch, as a function of (seed, epoch, row index) only, so a resumed run and any process
    layout (processes, accumulation, pieces) replace the same rows."""

    STREAM = 1  # keeps these draws independent of the data order's, which is seeded by (seed, epoch)

    def __init__(self, p: float, seed: int, n_rows: int, known_ids: list[int], unknown_id: int) -> None:
        self.p, self.seed, self.n_rows = p, seed, n_rows
        self.known, self.unknown = torch.tensor(known_ids), unknown_id
        self._cache: tuple[int, np.ndarray] | None = None

    def dropped(self, epoch: int) -> np.ndarray:
        """Boolean mask over the rows: True where the row's stability token is replaced this epoch."""
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, self.STREAM])
            self._cache = (epoch, rng.random(self.n_rows) < self.p)
        return self._cache[1]

    def apply(self, epoch: int, index: int, row: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.dropped(epoch)[index]:
            return row
        ids, values = row
        return torch.where(torch.isin(ids, self.known), self.unknown, ids), values


def stability_dropout(cfg: TrainConfig, vocab_hash: str, n_rows: int) -> StabilityDropout | None:
    """The StabilityDropout of a run (None when off); the token ids come from the installed vocabulary."""
    if not cfg.stability_dropout:
        return None
    vocab = default_vocab()
    if vocab.hash != vocab_hash:
        raise _fail(f"stability_dropout needs the vocabulary's stability tokens; the installed vocabulary "
                    f"{vocab.hash!r} is not the dataset's {vocab_hash!r}")
    ids = vocab.token_to_id
    known = [ids[token] for level, token in STABILITY_TOKENS.items() if level is not None]
    return StabilityDropout(cfg.stability_dropout, cfg.seed, n_rows, known, ids[STABILITY_TOKENS[None]])


def input_features(config: WyckoffGPTConfig, vocab_hash: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The per-token features `collate` must add for this model (None: it reads tokens and values only)."""
    if not config.composition_slots:
        return None
    vocab = default_vocab()
    if vocab.hash != vocab_hash:
        raise _fail(f"the running composition needs the vocabulary tables; the installed vocabulary "
                    f"{vocab.hash!r} is not the dataset's {vocab_hash!r}")
    compute = feature_function(vocab, config.composition_slots, getattr(config, "charge_feature", False))
    # The features are a pure function of the ids and every sequence comes back each epoch; computed
    # in Python they can take longer than a GPU step, so each is computed once.
    memo: dict[bytes, np.ndarray] = {}

    def features(ids: np.ndarray) -> np.ndarray:
        key = ids.tobytes()
        if key not in memo:
            memo[key] = compute(ids)
        return memo[key]

    return features


@torch.no_grad()
def evaluate(acc: Accelerator, model, dataset: SequenceDataset, batch_size: int, pad: int,
             features: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, float]:
    """Loss parts over a whole split, each process taking every world-th sequence."""
    model.eval()
    sums = LossSums.zeros(acc.device)
    mine = np.arange(acc.process_index, len(dataset), acc.num_processes)
    for lo in range(0, len(mine), batch_size):
        batch = collate([dataset[int(i)] for i in mine[lo : lo + batch_size]], pad, features)
        sums = sums + LossSums.of(model(**_to_device(batch, acc.device), compute_loss=True))
    model.train()
    return sums.reduced(acc).means()


# ----------------------------------------------------------------------------------------------------
# Model card and export


def _stability_classes(meta: dict) -> str:
    """The card's sentence on what `ehull:low` meant in the training data."""
    threshold = meta.get("stability_threshold")
    boundary = f"{threshold:g} eV/atom" if threshold is not None else "the threshold of data_prep/prepare.py"
    return f"Stability classes: `ehull:low` below {boundary} above the hull, `ehull:high` at or above it."


def _model_card(cfg: TrainConfig, meta: dict, config: WyckoffGPTConfig, n_params: int, summary: dict) -> str:
    def fmt(d: dict | None) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in d.items()) if d else "n/a"

    command = cfg.command or f"python train.py --data {cfg.data_dir} --out {cfg.out_dir} --model-preset {cfg.model_preset}"
    hub_base = cfg.init_from if cfg.init_from and _is_hub_id(cfg.init_from) else None
    # Ordered for a user: what it is, how good, how to use it, what it learnt from, its limits; then
    # how it was trained.
    return f"""---
library_name: transformers
tags: [crystal-structure-generation, wyckoffgpt]
{f"base_model: {hub_base}" + chr(10) if hub_base else ""}---
# WyckoffGPT model
{_fine_tuning_lines(cfg, meta)}
Autoregressive transformer over Wyckoff-position token sequences (discrete token head + {config.continuous_head}
value head for coordinates, lattice lengths and angles): preset `{cfg.model_preset}`, {config.n_layer} blocks,
d={config.n_embd}, {config.n_head} heads, {n_params:,} parameters; vocabulary hash `{config.vocab_hash}`
({config.vocab_size} tokens).

## How good

- Best validation loss: {fmt(summary['best_val_parts'])}
- Final training loss (last logging window): {fmt(summary['train'])}

Losses are per target token (cross-entropy plus value NLL where the next token carries a value); value parts
are per value, as negative log densities in natural units (fraction, Å, degree). The quality of its samples
(validity, uniqueness, novelty, SMACT) is not measured at training time:
`python benchmarks/quality.py --model THIS_FOLDER --data {cfg.data_dir}` measures it.

## Use

```bash
python generate.py --model THIS_FOLDER --elements Al Ca Cu --ehull low
```

```python
from wyckoffgpt import CrystalGenerator
gen = CrystalGenerator.from_pretrained("path/to/this/folder")
```

With transformers alone: `AutoModel.from_pretrained(folder, trust_remote_code=True)` (or `import wyckoffgpt`
first, which registers the model with the Auto classes).

## Training data

`{cfg.data_dir}` ({meta['splits'].get('train', 0)} training / {meta['splits'].get('val', 0)} validation sequences,
{meta.get('split', 'random')} split). {_stability_classes(meta)}
The licence of the model follows that of its training data.

## Limitations

The model proposes crystals like those of its training data; their stability is not known until they are
relaxed and compared with a convex hull (`generate.py --relax`).

## Training details

- Command: `{command}`
- {summary['step']} optimizer steps ({summary['epochs_done']:.2f} epochs), {summary['processes']} process(es),
  mixed precision `{cfg.mixed_precision}`, stopped because: {summary['stop_reason']}.
- Exported weights: {summary['exported']}.
"""


def _is_hub_id(init_from: str) -> bool:
    return init_from != BUNDLED_INIT and not Path(init_from).expanduser().exists() and "/" in init_from


def describe_base_model(init_from: str) -> str:
    """How the model card names the model that fine-tuning started from."""
    if init_from == BUNDLED_INIT:
        return f"the model bundled with the wyckoffgpt package, `{resolve_init_from(init_from).name}`"
    if _is_hub_id(init_from):
        return f"the Hugging Face Hub model `{init_from}`"
    return f"the model folder `{init_from}`"


def _fine_tuning_lines(cfg: TrainConfig, meta: dict) -> str:
    if not cfg.init_from:
        return ""
    frozen = (f" The input embeddings and the first {cfg.freeze_blocks} block(s) were frozen."
              if cfg.freeze_blocks else "")
    return f"""
Fine-tuned from {describe_base_model(cfg.init_from)}, on the data `{cfg.data_dir}`
({meta['splits'].get('train', 0)} training / {meta['splits'].get('val', 0)} validation sequences; the losses
below are on these).{frozen}
"""


def _export_tokenizer(out: Path, vocab_hash: str) -> None:
    vocab = default_vocab()
    if vocab.hash != vocab_hash:
        # The packaged vocabulary is not the dataset's: shipping it would mis-decode the model's tokens.
        warnings.warn(f"tokenizer not exported: its vocabulary hash {vocab.hash} != dataset's {vocab_hash}")
        return
    vocab.save_pretrained(out)


# ----------------------------------------------------------------------------------------------------
# The training function


def resolve_init_from(init_from: str) -> Path:
    """The model folder that `TrainConfig.init_from` names (see there); TrainingError if none."""
    folder = Path(init_from).expanduser()
    if init_from != BUNDLED_INIT and folder.is_dir():
        return folder
    # Imported here: generation needs pymatgen, which training from a model folder does not.
    from .generation import InputError, resolve_model_path

    try:
        return resolve_model_path(None if init_from == BUNDLED_INIT else init_from)
    except InputError as e:
        raise _fail(f"--init-from: {e}") from None


def with_defaults(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its None settings replaced by the scratch or the fine-tuning defaults."""
    defaults = FINETUNE_DEFAULTS if cfg.init_from else SCRATCH_DEFAULTS
    return replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def freeze_first_blocks(model: WyckoffGPTModel, k: int) -> int:
    """Freeze the input embeddings and the first k blocks (see TrainConfig.freeze_blocks); returns the
    number of frozen parameters."""
    if k > len(model.blocks):
        raise _fail(f"freeze_blocks {k} is more than the model's {len(model.blocks)} blocks")
    modules = [model.wte, model.value_embedding, model.wpe, model.composition_embedding,
               getattr(model, "charge_embedding", None), getattr(model, "element_embedding", None),
               *model.blocks[:k]]  # fmt: skip
    frozen = 0
    for module in filter(None, modules):
        for p in module.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


def _lr_lambda(total_steps: int, warmup_frac: float, final_frac: float):
    warmup = max(1, int(round(warmup_frac * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 1.0 - (1.0 - final_frac) * min(progress, 1.0)

    return factor


def element_overrides(cfg: TrainConfig, vocab_hash: str) -> dict[str, Any]:
    """The WyckoffGPTConfig fields that TrainConfig.element_features sets: every element token of the
    vocabulary and its properties."""
    if not cfg.element_features:
        return {}
    from .chemistry import element_property_table  # pymatgen: only when asked for

    vocab = default_vocab()
    if vocab.hash != vocab_hash:
        raise _fail(f"element_features needs the installed vocabulary ({vocab.hash}); the dataset uses {vocab_hash}")
    symbols = [vocab.z_symbol[z] for z in sorted(vocab.z_symbol)]
    return {"element_token_ids": [vocab.element_ids[s] for s in symbols],
            "element_properties": element_property_table(symbols)}


def _model_config(cfg: TrainConfig, meta: dict, resume_config: WyckoffGPTConfig | None) -> WyckoffGPTConfig:
    vocab = {k: meta[k] for k in VOCAB_FIELDS}
    overrides = {**cfg.model_overrides, **element_overrides(cfg, meta["vocab_hash"])}
    if resume_config is not None:
        config = resume_config
    elif cfg.init_from:
        try:
            config = WyckoffGPTConfig.from_pretrained(str(resolve_init_from(cfg.init_from)))
        except (OSError, ValueError) as e:
            raise _fail(f"cannot read model config from {cfg.init_from}: {e}") from None
        # Overrides on top of a trained model: e.g. dropout, or composition_slots, whose new input
        # layer starts at zero so the model starts out as it was saved.
        config.update(overrides)
    else:
        return WyckoffGPTConfig.from_preset(cfg.model_preset, **{**vocab, **overrides})
    if config.vocab_hash != meta["vocab_hash"] or config.vocab_size != meta["vocab_size"]:
        raise _fail(
            f"vocabulary mismatch: model has vocab_hash {config.vocab_hash!r} ({config.vocab_size} tokens), "
            f"dataset {cfg.data_dir} has {meta['vocab_hash']!r} ({meta['vocab_size']} tokens); "
            f"tokenize the data with the model's vocabulary (data_prep/prepare.py) or train from scratch"
        )
    return config


@dataclass
class _Run:
    """What the stages of `train` share: the settings in force, the data, the model and its optimizer,
    and the position in the schedule (`state`, saved with each checkpoint)."""

    cfg: TrainConfig
    acc: Accelerator
    out: Path
    meta: dict[str, Any]
    config: WyckoffGPTConfig
    train_set: SequenceDataset
    val_set: SequenceDataset | None
    features: Callable[[np.ndarray], np.ndarray] | None
    batches: EpochBatches
    stability: StabilityDropout | None
    total_steps: int
    targets_per_step: float
    model: Any  # as prepared by accelerate (DDP-wrapped with several processes), like the two below
    optimizer: Any
    scheduler: Any
    n_params: int
    state: dict[str, Any]
    log: _Logger


STEP_BUDGET = "reached the step budget"  # the stop reason of a run that did all its steps


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a model and export it to `cfg.out_dir`; returns a summary dict."""
    _validate(cfg)
    run = _setup(with_defaults(cfg))
    if run.cfg.finish:
        return _finish_early(run)
    window = _Window(run.acc.device)
    stop_reason = STEP_BUDGET
    run.model.train()
    while run.state["step"] < run.total_steps:
        window.add(_train_step(run))
        row = window.row() if _is_due(run, run.cfg.log_every) else {}
        with window.paused():  # evaluation and checkpoint time is not training throughput
            improved = _evaluate(run, row) if run.val_set is not None and _is_due(run, run.cfg.eval_every) else None
            _write_log(run, row, window)
            interrupted = _checkpoint_if_due(run)
        if interrupted:
            run.log.close()
            run.acc.print(f"stopped at step {run.state['step']} as asked; continue with --resume")
            return {"step": run.state["step"], "stop_reason": "stop_at_step", "exported": None, "train": window.last}
        if improved is False and run.state["bad_evals"] >= run.cfg.patience:
            stop_reason = f"early stopping: no validation improvement in {run.cfg.patience} evaluations"
            break
    run.log.close()
    if stop_reason != STEP_BUDGET:
        run.acc.print(stop_reason)
    return _finish(run, stop_reason, window.last)


def _finish_early(run: _Run) -> dict[str, Any]:
    """Export an interrupted run as it stands (`finish`)."""
    step = run.state["step"]
    if step == 0:
        raise _fail(f"nothing to finish: {run.out} holds no checkpoint of an interrupted run")
    return _finish(run, f"ended at step {step} of {run.total_steps} on request (finish)",
                   _last_logged_train(run.out / "train_log.csv"))


# -- setup


def _setup(cfg: TrainConfig) -> _Run:
    """Data, resume point, settings in force, model, optimizer and schedule, then the opening line."""
    meta, train_set, val_set = _load_data(cfg)
    out = Path(cfg.out_dir)
    checkpoint, resume_state, resume_config = _resume_point(cfg, out)
    config = _model_config(cfg, meta, resume_config)
    features = input_features(config, meta["vocab_hash"])
    stability = stability_dropout(cfg, meta["vocab_hash"], len(train_set))
    _check_fits(cfg, meta, config)

    acc = _accelerator(cfg)
    cfg = _settings_in_force(cfg, acc.device)
    batches = _epoch_batches(cfg, acc, train_set)
    total_steps = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_val": None, "best_val_parts": None, "bad_evals": 0,
             "layout": _layout(cfg, acc), "total_steps": total_steps}  # fmt: skip
    _check_layout(resume_state, state["layout"])

    model, n_params, frozen = _model(cfg, config, fresh=resume_state is None)
    optimizer, scheduler = _optimizer(cfg, model, total_steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    if checkpoint is not None:
        _restore(acc, checkpoint, state, resume_state)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(out / "train_log.csv", state["step"])
    acc.print(_opening_line(cfg, acc, len(train_set), batches, total_steps, n_params, frozen,
                            state["step"] if checkpoint else None))  # fmt: skip
    bar = tqdm(total=total_steps, initial=state["step"], disable=not (cfg.progress and acc.is_main_process),
               dynamic_ncols=True)  # fmt: skip
    return _Run(
        cfg=cfg, acc=acc, out=out, meta=meta, config=config, train_set=train_set, val_set=val_set,
        features=features, batches=batches, stability=stability, total_steps=total_steps,
        # The summed loss of a step is divided by this constant, so that every target token weighs the
        # same (see length_buckets for what else that needs).
        targets_per_step=float(np.mean(batches.lengths - 1)) * cfg.batch_size * batches.micro_per_step,
        model=model, optimizer=optimizer, scheduler=scheduler, n_params=n_params, state=state,
        log=_Logger(acc, out / "train_log.csv", bar),
    )  # fmt: skip


def _load_data(cfg: TrainConfig) -> tuple[dict[str, Any], SequenceDataset, SequenceDataset | None]:
    try:
        meta = load_meta(cfg.data_dir)
        train_set = SequenceDataset(cfg.data_dir, "train")
        val_set = SequenceDataset(cfg.data_dir, "val") if meta["splits"].get("val") else None
    except DatasetError as e:
        raise _fail(str(e)) from None
    if len(train_set) == 0:
        raise _fail(f"dataset {cfg.data_dir} has an empty train split")
    return meta, train_set, val_set


def _resume_point(cfg: TrainConfig, out: Path) -> tuple[Path | None, dict[str, Any] | None, WyckoffGPTConfig | None]:
    """The checkpoint to resume from, its trainer state and model config (all None for a fresh run)."""
    checkpoints = _checkpoints(out)
    if checkpoints and not cfg.resume:
        raise _fail(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")
    if not (cfg.resume and checkpoints):
        return None, None, None
    return checkpoints[-1], *_read_checkpoint(checkpoints[-1])


def _check_fits(cfg: TrainConfig, meta: dict[str, Any], config: WyckoffGPTConfig) -> None:
    if meta.get("max_length", 0) > config.max_position_embeddings:
        raise _fail(
            f"dataset sequences reach {meta['max_length']} tokens, more than the model's "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise _fail("fp16 mixed precision needs a GPU; use bf16 on CPU")


def _accelerator(cfg: TrainConfig) -> Accelerator:
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with other
    # settings (e.g. a bf16 run after an fp32 one in the same Python session): start it afresh. The
    # PartialState (process group) is kept.
    AcceleratorState._reset_state()
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),  # without it, CPU processes would not join one gloo group
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the world size
    )
    # Accumulation is done by hand (no_sync + one backward per micro-batch), because the loss of a step
    # is normalised by one constant for all its micro-batches, not averaged per micro-batch.
    set_seed(cfg.seed)
    return acc


def _settings_in_force(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """`cfg` with "the preset's" and "the device's" settings made explicit: the run uses them, and the
    summary and the model card record them."""
    preset = PRESET_TRAINING[cfg.model_preset]
    return replace(
        cfg,
        batch_size=cfg.batch_size or preset["batch_size"],
        max_lr=cfg.max_lr or preset["max_lr"],
        weight_decay=preset["weight_decay"] if cfg.weight_decay is None else cfg.weight_decay,
        length_sorted_pieces=cfg.length_sorted_pieces or (1 if device.type == "cuda" else 4),
    )


def _epoch_batches(cfg: TrainConfig, acc: Accelerator, train_set: SequenceDataset) -> EpochBatches:
    batches = EpochBatches(train_set.lengths(), cfg.batch_size, cfg.grad_accum_steps, acc.num_processes,
                           acc.process_index, cfg.seed, bucket=cfg.length_buckets)  # fmt: skip
    if batches.steps_per_epoch == 0:
        need = cfg.batch_size * cfg.grad_accum_steps * acc.num_processes
        raise _fail(
            f"train split has {len(train_set)} sequences, fewer than one optimizer step uses (batch_size "
            f"{cfg.batch_size} x grad_accum {cfg.grad_accum_steps} x processes {acc.num_processes} = {need})"
        )
    return batches


def _layout(cfg: TrainConfig, acc: Accelerator) -> dict[str, Any]:
    """What the data position of a checkpoint is counted in."""
    return {"processes": acc.num_processes, "batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps,
            "length_buckets": cfg.length_buckets}  # fmt: skip


def _check_layout(resume_state: dict[str, Any] | None, layout: dict[str, Any]) -> None:
    if resume_state is None:
        return
    resume_state.setdefault("layout", layout).setdefault("length_buckets", True)  # older runs bucketed
    if resume_state["layout"] != layout:
        # The data position is counted in steps of this layout; another one would read other batches.
        raise _fail(f"checkpoint was written with {resume_state['layout']}, this run has {layout}; resume with the same")


def _model(cfg: TrainConfig, config: WyckoffGPTConfig, fresh: bool) -> tuple[WyckoffGPTModel, int, int]:
    """The model to train (a resumed run's weights come with its checkpoint), its parameter count and
    how many of them are frozen."""
    if cfg.init_from and fresh:
        model = WyckoffGPTModel.from_pretrained(str(resolve_init_from(cfg.init_from)), config=config, dtype=torch.float32)
    else:
        model = WyckoffGPTModel(config)
    frozen = freeze_first_blocks(model, cfg.freeze_blocks) if cfg.freeze_blocks else 0
    return model, model.num_parameters(), frozen


def _optimizer(cfg: TrainConfig, model: WyckoffGPTModel, total_steps: int):
    """AdamW (weight decay on the weight matrices only) and its one-cycle schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.max_lr,
        betas=cfg.betas,
        fused=True,  # one kernel for all tensors, not one per tensor
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, cfg.warmup_frac, cfg.final_lr_frac))
    return optimizer, scheduler


def _restore(acc: Accelerator, checkpoint: Path, state: dict[str, Any], resume_state: dict[str, Any]) -> None:
    """Weights, optimizer, schedule and RNG states from `checkpoint`; the position into `state`."""
    try:
        acc.load_state(str(checkpoint))
    except Exception as e:  # accelerate raises many kinds for truncated or foreign files
        raise _fail(f"checkpoint {checkpoint} is corrupt: {type(e).__name__}: {e}") from None
    state.update(resume_state)


def _opening_line(cfg: TrainConfig, acc: Accelerator, n_train: int, batches: EpochBatches, total_steps: int,
                  n_params: int, frozen: int, resumed_at: int | None) -> str:
    return (
        f"model {n_params:,} params, {n_train} train seqs, {batches.steps_per_epoch} steps/epoch, "
        f"{total_steps} steps, batch {cfg.batch_size}x{cfg.grad_accum_steps}x{acc.num_processes} in "
        f"{cfg.length_sorted_pieces} length-sorted piece(s), lr {cfg.max_lr:g}, weight decay {cfg.weight_decay:g}, "
        f"precision {cfg.mixed_precision}"
        + (f", from {cfg.init_from}" if cfg.init_from else "")
        + (f", {frozen:,} params frozen" if frozen else "")
        + (f", stability dropout {cfg.stability_dropout:g}" if cfg.stability_dropout else "")
        + (", element properties" if cfg.element_features else "")
        + (f", resumed at step {resumed_at}" if resumed_at is not None else "")
    )


# -- the step


def _train_step(run: _Run) -> LossSums:
    """One optimizer step over this process's micro-batches; returns the step's loss sums, all processes."""
    state, acc, model = run.state, run.acc, run.model
    if state["step_in_epoch"] >= run.batches.steps_per_epoch:
        state["epoch"] += 1
        state["step_in_epoch"] = 0
    micro = _micro_batches(run, state["epoch"], state["step_in_epoch"])
    # DDP averages gradients over processes; multiplying by world turns that back into a sum.
    scale = acc.num_processes / run.targets_per_step
    sums = LossSums.zeros(acc.device)
    for j, batch in enumerate(micro):
        sync = contextlib.nullcontext() if j == len(micro) - 1 else acc.no_sync(model)
        with sync:
            output = model(**_to_device(batch, acc.device), compute_loss=True)
            acc.backward(output.loss_sum * scale)
        sums = sums + LossSums.of(output)
    sums = sums.reduced(acc)
    if run.cfg.grad_clip > 0:
        acc.clip_grad_norm_(model.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state["step"] += 1
    state["step_in_epoch"] += 1
    run.log.bar.update(1)
    return sums


def _micro_batches(run: _Run, epoch: int, step_in_epoch: int) -> list[dict[str, torch.Tensor]]:
    """This process's batches of one step: its micro-batches, each as length-sorted pieces."""
    lengths, pieces = run.batches.lengths, run.cfg.length_sorted_pieces

    def row(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = run.train_set[i]
        return run.stability.apply(epoch, i, drawn) if run.stability else drawn

    return [
        collate([row(int(i)) for i in piece], run.config.pad_token_id, run.features)
        for idx in run.batches.step_indices(epoch, step_in_epoch)
        for piece in _length_sorted_pieces(idx, lengths, pieces)
    ]


class _Window:
    """Training losses and throughput since the last log line."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = LossSums.zeros(device)
        self.start = self.run_start = time.perf_counter()
        self.last: dict[str, float] | None = None  # the losses of the last full window

    def add(self, sums: LossSums) -> None:
        self.sums = self.sums + sums

    def row(self) -> dict[str, Any]:
        """The log row's training losses and tokens per second; starts a new window."""
        elapsed = time.perf_counter() - self.start
        self.last = self.sums.means()
        row: dict[str, Any] = {_log_column(k): v for k, v in self.last.items()}
        row["tokens_per_s"] = float(self.sums.tokens) / max(elapsed, 1e-9)
        self.sums = LossSums.zeros(self.device)
        self.start = time.perf_counter()
        return row

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count towards the window's throughput."""
        pause_start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - pause_start


def _write_log(run: _Run, row: dict[str, Any], window: _Window) -> None:
    """One line of train_log.csv and the console, when the step has losses to report."""
    if row:
        row.update(step=run.state["step"], epoch=run.state["epoch"], lr=run.scheduler.get_last_lr()[0],
                   elapsed_s=time.perf_counter() - window.run_start)  # fmt: skip
        run.log.write(row)


def _is_due(run: _Run, every: int | None) -> bool:
    """Whether something done every `every` steps (and at the last one) is due now; never when 0."""
    step = run.state["step"]
    return bool(every) and (step % every == 0 or step == run.total_steps)


# -- evaluation and checkpoints


def _evaluate(run: _Run, row: dict[str, Any]) -> bool:
    """Validation losses into the log `row`; the best weights so far kept in out/best. Returns whether
    the loss improved (state's bad_evals counts the evaluations since it last did)."""
    cfg, state = run.cfg, run.state
    val = evaluate(run.acc, run.model, run.val_set, cfg.eval_batch_size or 2 * cfg.batch_size,
                   run.config.pad_token_id, run.features)  # fmt: skip
    row.update({_log_column(k, "val_"): v for k, v in val.items()})
    if state["best_val"] is None or val["loss"] < state["best_val"] - cfg.min_delta:
        state["best_val"], state["best_val_parts"], state["bad_evals"] = val["loss"], val, 0
        _save_best(run.acc, run.model, run.out)
        return True
    state["bad_evals"] += 1
    return False


def _checkpoint_if_due(run: _Run) -> bool:
    """Write a checkpoint every save_every steps, and at stop_at_step; returns whether the run stops there."""
    step, cfg = run.state["step"], run.cfg
    interrupted = cfg.stop_at_step is not None and cfg.stop_at_step <= step < run.total_steps
    if (cfg.save_every and step % cfg.save_every == 0) or interrupted:
        _save_checkpoint(run.acc, run.out, run.state, run.config, cfg.keep_last_checkpoints)
    return interrupted


# -- finish


def _finish(run: _Run, stop_reason: str, last_train: dict[str, float] | None) -> dict[str, Any]:
    """Export the model (the best validated weights if there are any) and return the run's summary."""
    state = run.state
    summary = {
        "step": state["step"],
        "epoch": state["epoch"],
        "epochs_done": state["step"] / run.batches.steps_per_epoch,
        "processes": run.acc.num_processes,
        "stop_reason": stop_reason,
        "train": last_train,
        "best_val": state["best_val"],
        "best_val_parts": state["best_val_parts"],
        "out_dir": str(run.out),
    }
    _export(run.acc, run.model, run.out, run.cfg, run.meta, run.config, run.n_params, summary)
    return summary


def _save_best(acc: Accelerator, model, out: Path) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp, final = out / ".tmp-best", out / "best"
        shutil.rmtree(tmp, ignore_errors=True)
        acc.unwrap_model(model).save_pretrained(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    acc.wait_for_everyone()


def _export(acc, model, out: Path, cfg: TrainConfig, meta, config, n_params: int, summary: dict) -> None:
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(model)
    best = out / "best" / "model.safetensors"
    if best.is_file():
        # Early stopping keeps the best validated weights, not the last ones.
        weights = load_file(str(best), device=str(next(unwrapped.parameters()).device))
        missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - set(unwrapped._tied_weights_keys):
            raise _fail(f"best weights in {best} do not match the model ({missing=}, {unexpected=})")
        summary["exported"] = f"best validation checkpoint (val loss {summary['best_val']:.4f})"
    else:
        summary["exported"] = f"last step ({summary['step']})"
    unwrapped.save_pretrained(str(out), is_main_process=acc.is_main_process, save_function=acc.save)
    if acc.is_main_process:
        _export_tokenizer(out, meta["vocab_hash"])
        atomic_write(out / "README.md", _model_card(cfg, meta, config, n_params, summary))
        atomic_write(out / TRAINING_SUMMARY, json.dumps({**summary, "train_config": _jsonable(cfg)}, indent=2))
        if not cfg.keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            shutil.rmtree(out / "best", ignore_errors=True)
        acc.print(f"model written to {out}")
    acc.wait_for_everyone()


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


# ----------------------------------------------------------------------------------------------------
# Logging


def _last_logged_train(path: Path) -> dict[str, float] | None:
    """The training losses of the log's last row that has them (a finished run has no window of its own)."""
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    if not rows:
        return None
    return {part: float(rows[-1][_log_column(part)]) for part in ("loss", "token", "coord", "length", "angle")}


def _log_column(part: str, prefix: str = "") -> str:
    """train_log.csv's column of a loss part (`LossSums.means` key): "loss", "token_loss", "val_coord_loss"."""
    return f"{prefix}loss" if part == "loss" else f"{prefix}{part}_loss"


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be produced again)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


class _Logger:
    """train_log.csv rows and the matching console lines, under the progress bar."""

    def __init__(self, acc: Accelerator, path: Path, bar) -> None:
        self.acc, self.path, self.bar = acc, path, bar

    def close(self) -> None:
        self.bar.close()

    def write(self, row: dict[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        new = not self.path.is_file()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
        parts = [f"step {row['step']}", f"epoch {row['epoch']}"]
        for key, label in (("loss", "loss"), ("token_loss", "tok"), ("coord_loss", "coord"),
                           ("length_loss", "len"), ("angle_loss", "ang"), ("val_loss", "val")):  # fmt: skip
            if key in row and not (isinstance(row[key], float) and math.isnan(row[key])):
                parts.append(f"{label} {row[key]:.4f}")
        parts.append(f"lr {row['lr']:.2e}")
        if "tokens_per_s" in row:
            parts.append(f"tok/s {row['tokens_per_s']:.0f}")
        line = " | ".join(parts)
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)  # keeps the progress bar intact
