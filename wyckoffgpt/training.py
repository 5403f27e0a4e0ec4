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
from dataclasses import asdict, dataclass, field, fields, replace
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
from .configuration_wyckoffgpt import PRESET_TRAINING, PRESETS, WyckoffGPTConfig
from .data import VOCAB_FIELDS, DatasetError, SequenceDataset, collate, load_meta
from .modeling_wyckoffgpt import WyckoffGPTModel
from .vocab import default_vocab

STATE_FILE = "trainer_state.json"
CSV_COLUMNS = [
    "step", "epoch", "lr", "loss", "token_loss", "coord_loss", "length_loss", "angle_loss",
    "val_loss", "val_token_loss", "val_coord_loss", "val_length_loss", "val_angle_loss",
    "tokens_per_s", "elapsed_s",
]  # fmt: skip


class TrainingError(RuntimeError):
    """Bad training input (dataset, vocabulary, checkpoint, preset, settings); the message says which."""


@dataclass
class TrainConfig:
    data_dir: str | os.PathLike
    out_dir: str | os.PathLike
    model_preset: str = "small"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # any WyckoffGPTConfig field
    # Start from a trained model instead of random weights: a saved model folder, a Hub repo id (read
    # from the Hugging Face cache, fetched once if absent), or the word "bundled" for the model that
    # ships with the package (a folder of that name: "./bundled"). Fine-tuning: settings left None
    # below then take FINETUNE_DEFAULTS instead of the from-scratch defaults.
    init_from: str | None = None
    # Fine-tuning only: freeze the token/value/position/composition input embeddings and the first k
    # transformer blocks (0: train everything). The token head shares its weight with the token
    # embedding, so that weight stays frozen too; the value head, the later blocks and the final
    # LayerNorm train.
    freeze_blocks: int = 0
    batch_size: int | None = None  # sequences per micro-batch and process; None: the preset's
    grad_accum_steps: int = 1
    epochs: int = 10
    max_steps: int | None = None  # overrides epochs when set
    max_lr: float | None = None  # None: the preset's (paper: 2e-4); fine-tuning: 3e-5
    # One-cycle: linear warm-up over this fraction of the steps, then linear decay. None: 0.05;
    # fine-tuning: 0.02.
    warmup_frac: float | None = None
    final_lr_frac: float = 0.01
    weight_decay: float | None = None  # None: the preset's
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    # Group sequences of similar length into a step: less padding, but biased (length_sorted_pieces
    # below gets about the same speed without the bias). This model's gradient norm (5-30) is always
    # above grad_clip, so every step moves the weights as far, and with steps of only short or only
    # long crystals a short crystal's tokens weigh about 4x a long one's: the model trained so (before
    # 2026-11-23) sampled 24 % binaries where the data have 17 %. Shuffled steps mix lengths, and
    # every token weighs the same.
    length_buckets: bool = False
    # Run each micro-batch as this many pieces of similar length, sorted within the step: the step
    # and its gradient stay the same (the loss is a sum divided by a constant), only the padding
    # shrinks. A shuffled batch of 128 of these sequences is ~31 % real tokens when padded to its
    # longest, ~68 % in 4 pieces: 0.99 s instead of 2.55 s per step of the small preset on 2 CPU cores
    # (8 pieces: 1.01 s). None: 4 on a CPU, 1 on a GPU, whose steps are bound by per-kernel overhead
    # rather than by padded arithmetic.
    length_sorted_pieces: int | None = None
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 0
    eval_every: int | None = None  # optimizer steps; 0 disables validation. None: 200; fine-tuning: 50
    eval_batch_size: int | None = None
    patience: int | None = None  # evaluations without improvement before stopping early. None: 10; fine-tuning: 3
    min_delta: float = 0.0
    save_every: int = 500  # optimizer steps between checkpoints; 0: only at the end of an interrupted run
    keep_last_checkpoints: int = 2
    keep_checkpoints: bool = False  # keep checkpoints/ and best/ after the final export
    resume: bool = False
    stop_at_step: int | None = None  # stop (with a checkpoint) after this step, keeping the full schedule
    log_every: int = 20
    progress: bool = True
    command: str | None = None  # recorded in the model card


BUNDLED_INIT = "bundled"  # init_from value naming the model bundled with the package
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
    if not 0 <= cfg.final_lr_frac <= 1:
        raise _fail(f"final_lr_frac must be in [0, 1], got {cfg.final_lr_frac}")
    if cfg.model_preset not in PRESETS:
        raise _fail(f"unknown model preset {cfg.model_preset!r}; valid presets: {', '.join(PRESETS)}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise _fail(f"mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
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
    BUCKET_STEPS steps, then the steps shuffled), which cuts padding roughly in half on Wyckoff
    sequences whose lengths vary from ~10 to ~120 tokens (see TrainConfig.length_buckets for its
    cost). The tail that does not fill a whole step is dropped."""

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


def _parts(sums: torch.Tensor) -> dict[str, float]:
    """sums = [loss_sum, token, coord, length, angle, n_tokens, n_coord, n_length, n_angle]."""
    s = sums.double().tolist()
    n_tok = max(s[5], 1.0)
    return {
        "loss": s[0] / n_tok,
        "token": s[1] / n_tok,
        "coord": s[2] / s[6] if s[6] else float("nan"),
        "length": s[3] / s[7] if s[7] else float("nan"),
        "angle": s[4] / s[8] if s[8] else float("nan"),
    }


def _sums(out) -> torch.Tensor:
    return torch.stack(
        [
            out.loss_sum.detach().float(),
            out.token_loss_sum.detach().float(),
            out.coord_loss_sum.detach().float(),
            out.length_loss_sum.detach().float(),
            out.angle_loss_sum.detach().float(),
            out.n_tokens.float(),
            out.n_coord.float(),
            out.n_length.float(),
            out.n_angle.float(),
        ]
    )


def input_features(config: WyckoffGPTConfig, vocab_hash: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The per-token features `collate` must add for this model (None: it reads tokens and values only)."""
    if not config.composition_slots:
        return None
    vocab = default_vocab()
    if vocab.hash != vocab_hash:
        raise _fail(f"the running composition needs the vocabulary tables; the installed vocabulary "
                    f"{vocab.hash!r} is not the dataset's {vocab_hash!r}")
    compute = feature_function(vocab, config.composition_slots, getattr(config, "charge_feature", False))
    # The features are a pure function of the ids and every sequence comes back each epoch: computing
    # them in Python takes ~30 ms per batch of 256, several times a GPU step, so each is computed once.
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
    sums = torch.zeros(9, device=acc.device)
    mine = np.arange(acc.process_index, len(dataset), acc.num_processes)
    for lo in range(0, len(mine), batch_size):
        batch = collate([dataset[int(i)] for i in mine[lo : lo + batch_size]], pad, features)
        sums += _sums(model(**_to_device(batch, acc.device), compute_loss=True))
    model.train()
    return _parts(acc.reduce(sums, "sum"))


# ----------------------------------------------------------------------------------------------------
# Model card and export


def _model_card(cfg: TrainConfig, meta: dict, config: WyckoffGPTConfig, n_params: int, summary: dict) -> str:
    def fmt(d: dict | None) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in d.items()) if d else "n/a"

    command = cfg.command or f"python train.py --data {cfg.data_dir} --out {cfg.out_dir} --model-preset {cfg.model_preset}"
    hub_base = cfg.init_from if cfg.init_from and _is_hub_id(cfg.init_from) else None
    return f"""---
library_name: transformers
tags: [crystal-structure-generation, wyckoffgpt]
{f"base_model: {hub_base}" + chr(10) if hub_base else ""}---
# WyckoffGPT model
{_fine_tuning_lines(cfg, meta)}
Autoregressive transformer over Wyckoff-position token sequences (discrete token head + {config.continuous_head}
value head for coordinates, lattice lengths and angles).

- Architecture: preset `{cfg.model_preset}`, {config.n_layer} blocks, d={config.n_embd}, {config.n_head} heads,
  {n_params:,} parameters; vocabulary hash `{config.vocab_hash}` ({config.vocab_size} tokens).
- Data: `{cfg.data_dir}` ({meta['splits'].get('train', 0)} training / {meta['splits'].get('val', 0)} validation sequences).
- Command: `{command}`
- Training: {summary['step']} optimizer steps ({summary['epochs_done']:.2f} epochs), {summary['processes']} process(es),
  mixed precision `{cfg.mixed_precision}`, stopped because: {summary['stop_reason']}.
- Final training loss (last logging window): {fmt(summary['train'])}
- Best validation loss: {fmt(summary['best_val_parts'])}
- Exported weights: {summary['exported']}.

Losses are per target token (cross-entropy plus value NLL where the next token carries a value); value parts
are per value, as negative log densities in natural units (fraction, Å, degree).

## Use

```python
import wyckoffgpt  # registers the model with transformers' Auto classes
from transformers import AutoModel
model = AutoModel.from_pretrained("path/to/this/folder")
```

Without the package: `AutoModel.from_pretrained(folder, trust_remote_code=True)`.
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
    try:
        from .tokenizer import CrystalTokenizer
    except ImportError as e:
        warnings.warn(f"tokenizer not exported: wyckoffgpt.tokenizer unavailable ({e})")
        return
    tok = CrystalTokenizer()
    tok_hash = getattr(getattr(tok, "vocab", None), "hash", None)
    if tok_hash != vocab_hash:
        # The packaged vocabulary is not the dataset's: shipping it would mis-decode the model's tokens.
        warnings.warn(f"tokenizer not exported: its vocabulary hash {tok_hash} != dataset's {vocab_hash}")
        return
    tok.save_pretrained(out)


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
               getattr(model, "charge_embedding", None), *model.blocks[:k]]  # fmt: skip
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


def _model_config(cfg: TrainConfig, meta: dict, resume_config: WyckoffGPTConfig | None) -> WyckoffGPTConfig:
    vocab = {k: meta[k] for k in VOCAB_FIELDS}
    if resume_config is not None:
        config = resume_config
    elif cfg.init_from:
        try:
            config = WyckoffGPTConfig.from_pretrained(str(resolve_init_from(cfg.init_from)))
        except (OSError, ValueError) as e:
            raise _fail(f"cannot read model config from {cfg.init_from}: {e}") from None
        # Overrides on top of a trained model: e.g. dropout, or composition_slots, whose new input
        # layer starts at zero so the model starts out as it was saved.
        config.update(cfg.model_overrides)
    else:
        return WyckoffGPTConfig.from_preset(cfg.model_preset, **{**vocab, **cfg.model_overrides})
    if config.vocab_hash != meta["vocab_hash"] or config.vocab_size != meta["vocab_size"]:
        raise _fail(
            f"vocabulary mismatch: model has vocab_hash {config.vocab_hash!r} ({config.vocab_size} tokens), "
            f"dataset {cfg.data_dir} has {meta['vocab_hash']!r} ({meta['vocab_size']} tokens); "
            f"tokenize the data with the model's vocabulary (data_prep/prepare.py) or train from scratch"
        )
    return config


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a model and export it to `cfg.out_dir`; returns a summary dict."""
    _validate(cfg)
    cfg = with_defaults(cfg)
    try:
        meta = load_meta(cfg.data_dir)
        train_set = SequenceDataset(cfg.data_dir, "train")
        val_set = SequenceDataset(cfg.data_dir, "val") if meta["splits"].get("val") else None
    except DatasetError as e:
        raise _fail(str(e)) from None
    if len(train_set) == 0:
        raise _fail(f"dataset {cfg.data_dir} has an empty train split")

    out = Path(cfg.out_dir)
    checkpoints = _checkpoints(out)
    if checkpoints and not cfg.resume:
        raise _fail(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")
    resume_state, resume_config = _read_checkpoint(checkpoints[-1]) if cfg.resume and checkpoints else (None, None)

    preset_train = PRESET_TRAINING[cfg.model_preset]
    batch_size = cfg.batch_size or preset_train["batch_size"]
    max_lr = cfg.max_lr or preset_train["max_lr"]
    weight_decay = preset_train["weight_decay"] if cfg.weight_decay is None else cfg.weight_decay
    config = _model_config(cfg, meta, resume_config)
    pad = config.pad_token_id
    features = input_features(config, meta["vocab_hash"])
    if meta.get("max_length", 0) > config.max_position_embeddings:
        raise _fail(
            f"dataset sequences reach {meta['max_length']} tokens, more than the model's "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise _fail("fp16 mixed precision needs a GPU; use bf16 on CPU")

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
    world, rank = acc.num_processes, acc.process_index
    lengths = train_set.lengths()
    pieces = cfg.length_sorted_pieces or (1 if acc.device.type == "cuda" else 4)
    # The summary and the model card record the settings in force, not "the preset's" or "the device's".
    cfg = replace(cfg, batch_size=batch_size, max_lr=max_lr, weight_decay=weight_decay, length_sorted_pieces=pieces)
    batches = EpochBatches(lengths, batch_size, cfg.grad_accum_steps, world, rank, cfg.seed, bucket=cfg.length_buckets)
    if batches.steps_per_epoch == 0:
        need = batch_size * cfg.grad_accum_steps * world
        raise _fail(
            f"train split has {len(train_set)} sequences, fewer than one optimizer step uses "
            f"(batch_size {batch_size} x grad_accum {cfg.grad_accum_steps} x processes {world} = {need})"
        )
    total_steps = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
    targets_per_step = float(np.mean(lengths - 1)) * batch_size * batches.micro_per_step
    layout = {"processes": world, "batch_size": batch_size, "grad_accum_steps": cfg.grad_accum_steps,
              "length_buckets": cfg.length_buckets}
    if resume_state is not None:
        resume_state.setdefault("layout", layout).setdefault("length_buckets", True)  # older runs bucketed
    if resume_state is not None and resume_state["layout"] != layout:
        # The data position is counted in steps of this layout; another one would read other batches.
        raise _fail(f"checkpoint was written with {resume_state['layout']}, this run has {layout}; resume with the same")

    if cfg.init_from and resume_state is None:
        model = WyckoffGPTModel.from_pretrained(str(resolve_init_from(cfg.init_from)), config=config, dtype=torch.float32)
    else:
        model = WyckoffGPTModel(config)
    n_params = model.num_parameters()
    frozen = freeze_first_blocks(model, cfg.freeze_blocks) if cfg.freeze_blocks else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=max_lr,
        betas=cfg.betas,
        fused=True,  # one kernel for all tensors: ~10x faster than foreach on CPU
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, cfg.warmup_frac, cfg.final_lr_frac))
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)

    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_val": None, "best_val_parts": None, "bad_evals": 0,
             "layout": layout, "total_steps": total_steps}  # fmt: skip
    if resume_state is not None:
        try:
            acc.load_state(str(checkpoints[-1]))
        except Exception as e:  # accelerate raises many kinds for truncated or foreign files
            raise _fail(f"checkpoint {checkpoints[-1]} is corrupt: {type(e).__name__}: {e}") from None
        state.update(resume_state)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.csv"
    if acc.is_main_process:
        _truncate_log(log_path, state["step"])

    acc.print(
        f"model {n_params:,} params, {len(train_set)} train seqs, {batches.steps_per_epoch} steps/epoch, "
        f"{total_steps} steps, batch {batch_size}x{cfg.grad_accum_steps}x{world} in {pieces} length-sorted "
        f"piece(s), lr {max_lr:g}, weight decay {weight_decay:g}, precision {cfg.mixed_precision}"
        + (f", from {cfg.init_from}" if cfg.init_from else "")
        + (f", {frozen:,} params frozen" if frozen else "")
        + (f", resumed at step {state['step']}" if resume_state else "")
    )
    bar = tqdm(total=total_steps, initial=state["step"], disable=not (cfg.progress and acc.is_main_process), dynamic_ncols=True)
    log = _Logger(acc, log_path, bar)
    window = torch.zeros(9, device=acc.device)
    window_tokens, window_start, run_start = 0.0, time.perf_counter(), time.perf_counter()
    stop_reason, last_train = "reached the step budget", None

    model.train()
    while state["step"] < total_steps:
        if state["step_in_epoch"] >= batches.steps_per_epoch:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
        micro = [
            collate([train_set[int(i)] for i in piece], pad, features)
            for idx in batches.step_indices(state["epoch"], state["step_in_epoch"])
            for piece in _length_sorted_pieces(idx, lengths, pieces)
        ]
        # The summed loss of a step is divided by a constant, the mean number of targets per step, so
        # that every target token weighs the same (see length_buckets for what else that needs). DDP
        # averages gradients over processes; multiplying by world turns that back into a sum.
        scale = world / targets_per_step
        step_sums = torch.zeros(9, device=acc.device)
        for j, batch in enumerate(micro):
            sync = contextlib.nullcontext() if j == len(micro) - 1 else acc.no_sync(model)
            with sync:
                output = model(**_to_device(batch, acc.device), compute_loss=True)
                acc.backward(output.loss_sum * scale)
            step_sums += _sums(output)
        step_sums = acc.reduce(step_sums, "sum")
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["step_in_epoch"] += 1
        bar.update(1)

        window += step_sums
        window_tokens += float(step_sums[5])  # target tokens of the step, all processes
        row: dict[str, Any] = {}
        if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
            elapsed = time.perf_counter() - window_start
            last_train = _parts(window)
            row.update({f"{k}_loss" if k != "loss" else "loss": v for k, v in last_train.items()})
            row["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
            window.zero_()
            window_tokens, window_start = 0.0, time.perf_counter()

        stop_early = False
        pause_start = time.perf_counter()  # evaluation and checkpoint time is not training throughput
        if val_set is not None and cfg.eval_every and (state["step"] % cfg.eval_every == 0 or state["step"] == total_steps):
            val = evaluate(acc, model, val_set, cfg.eval_batch_size or 2 * batch_size, pad, features)
            row.update({f"val_{k}_loss" if k != "loss" else "val_loss": v for k, v in val.items()})
            if state["best_val"] is None or val["loss"] < state["best_val"] - cfg.min_delta:
                state["best_val"], state["best_val_parts"], state["bad_evals"] = val["loss"], val, 0
                _save_best(acc, model, out)
            else:
                state["bad_evals"] += 1
                if state["bad_evals"] >= cfg.patience:
                    stop_early = True
                    stop_reason = f"early stopping: no validation improvement in {cfg.patience} evaluations"
        if row:
            row.update(step=state["step"], epoch=state["epoch"], lr=scheduler.get_last_lr()[0],
                       elapsed_s=time.perf_counter() - run_start)  # fmt: skip
            log.write(row)

        window_start += time.perf_counter() - pause_start
        interrupted = cfg.stop_at_step is not None and state["step"] >= cfg.stop_at_step and state["step"] < total_steps
        if (cfg.save_every and state["step"] % cfg.save_every == 0) or interrupted:
            pause_start = time.perf_counter()
            _save_checkpoint(acc, out, state, config, cfg.keep_last_checkpoints)
            window_start += time.perf_counter() - pause_start
        if interrupted:
            bar.close()
            acc.print(f"stopped at step {state['step']} as asked; continue with --resume")
            return {"step": state["step"], "stop_reason": "stop_at_step", "exported": None, "train": last_train}
        if stop_early:
            break
    bar.close()
    if stop_reason.startswith("early"):
        acc.print(stop_reason)

    summary = {
        "step": state["step"],
        "epoch": state["epoch"],
        "epochs_done": state["step"] / batches.steps_per_epoch,
        "processes": world,
        "stop_reason": stop_reason,
        "train": last_train,
        "best_val": state["best_val"],
        "best_val_parts": state["best_val_parts"],
        "out_dir": str(out),
    }
    _export(acc, model, out, cfg, meta, config, n_params, summary)
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
        atomic_write(out / "training_summary.json", json.dumps({**summary, "train_config": _jsonable(cfg)}, indent=2))
        if not cfg.keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            shutil.rmtree(out / "best", ignore_errors=True)
        acc.print(f"model written to {out}")
    acc.wait_for_everyone()


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


# ----------------------------------------------------------------------------------------------------
# Logging


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
    def __init__(self, acc: Accelerator, path: Path, bar) -> None:
        self.acc, self.path, self.bar = acc, path, bar

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
