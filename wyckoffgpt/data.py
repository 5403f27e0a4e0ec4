"""On-disk tokenized dataset: writer, reader and batch collation.

Layout of a dataset folder DIR:
  DIR/meta.json               format, vocabulary facts (hash, size, special and value token ids),
                              max_length and the number of sequences per split
  DIR/{split}.ids.npy         int16, all sequences of the split concatenated
  DIR/{split}.values.npy      float32, same length; NaN where the token carries no value
  DIR/{split}.offsets.npy     int64, n + 1 sequence boundaries
Each sequence starts with bos and ends with eos. Arrays are memory-mapped, so a dataset larger than
memory can be read by several processes at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .atomic import atomic_write

FORMAT = "wyckoffgpt-dataset-v1"
VOCAB_FIELDS = (
    "vocab_hash",
    "vocab_size",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "coord_token_ids",
    "length_token_ids",
    "angle_token_ids",
)
ARRAYS = ("ids", "values", "offsets")


class DatasetError(ValueError):
    """A dataset folder is missing, empty, malformed or inconsistent."""


def write_dataset(
    out_dir: str | os.PathLike,
    splits: dict[str, list[tuple[np.ndarray, np.ndarray]]],
    meta: dict[str, Any],
) -> None:
    """Write `splits` ({name: [(ids, values), ...]}) and `meta` (the vocabulary fields plus anything
    else) to `out_dir`. meta.json is written last, so a folder with a meta.json is complete."""
    missing = [k for k in VOCAB_FIELDS if k not in meta]
    if missing:
        raise DatasetError(f"dataset meta lacks {', '.join(missing)}")
    if meta["vocab_size"] > np.iinfo(np.int16).max + 1:
        raise DatasetError(f"vocab_size {meta['vocab_size']} does not fit the int16 token ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    max_length = 0
    for name, seqs in splits.items():
        lengths = np.array([len(ids) for ids, _ in seqs], dtype=np.int64)
        for i, (ids, values) in enumerate(seqs):
            if len(ids) != len(values):
                raise DatasetError(f"{name} sequence {i}: {len(ids)} ids but {len(values)} values")
            if len(ids) < 2 or ids[0] != meta["bos_token_id"] or ids[-1] != meta["eos_token_id"]:
                raise DatasetError(f"{name} sequence {i} must start with bos and end with eos")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.concatenate([np.asarray(s[0]) for s in seqs]).astype(np.int16) if seqs else np.zeros(0, np.int16)
        values = (
            np.concatenate([np.asarray(s[1], dtype=np.float32) for s in seqs]) if seqs else np.zeros(0, np.float32)
        )
        for suffix, arr in (("ids", ids), ("values", values), ("offsets", offsets)):
            atomic_write(out / f"{name}.{suffix}.npy", lambda f, a=arr: np.save(f, a))
        max_length = max(max_length, int(lengths.max()) if len(lengths) else 0)
    full = {**meta, "format": FORMAT, "max_length": max_length, "splits": {k: len(v) for k, v in splits.items()}}
    atomic_write(out / "meta.json", lambda f: f.write(json.dumps(full, indent=2).encode()))


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a dataset folder, or a DatasetError naming what is wrong."""
    path = Path(data_dir)
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist")
    if not (path / "meta.json").is_file():
        kind = "is empty" if not any(path.iterdir()) else "has no meta.json"
        raise DatasetError(f"dataset folder {path} {kind}; build it with the data_prep tools first")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path / 'meta.json'} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DatasetError(f"{path / 'meta.json'} has format {found!r}, expected {FORMAT!r}")
    missing = [k for k in (*VOCAB_FIELDS, "splits") if k not in meta]
    if missing:
        raise DatasetError(f"{path / 'meta.json'} lacks {', '.join(missing)}")
    return meta


class SequenceDataset(Dataset):
    """One split of a dataset folder; item i is (ids int64 tensor, values float32 tensor)."""

    def __init__(self, data_dir: str | os.PathLike, split: str) -> None:
        self.dir = Path(data_dir)
        self.meta = load_meta(self.dir)
        if split not in self.meta["splits"]:
            raise DatasetError(f"dataset {self.dir} has no split {split!r} (has {', '.join(self.meta['splits'])})")
        try:
            self.ids, self.values, self.offsets = (
                np.load(self.dir / f"{split}.{a}.npy", mmap_mode="r") for a in ARRAYS
            )
        except (OSError, ValueError) as e:
            raise DatasetError(f"dataset {self.dir} split {split!r} is unreadable: {e}") from None
        n = len(self.offsets) - 1
        if n != self.meta["splits"][split] or len(self.ids) != len(self.values) or self.offsets[-1] != len(self.ids):
            raise DatasetError(f"dataset {self.dir} split {split!r} has inconsistent array sizes")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return (
            torch.from_numpy(np.asarray(self.ids[lo:hi], dtype=np.int64)),
            torch.from_numpy(np.array(self.values[lo:hi], dtype=np.float32)),
        )

    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))


def split_systems(data_dir: str | os.PathLike, split: str) -> list[str]:
    """Chemical system ("Al-Ca-Cu") of each sequence of a split, read from its element tokens."""
    from .vocab import default_vocab

    tokens = default_vocab().tokens
    dataset = SequenceDataset(data_dir, split)
    ids, offsets = np.asarray(dataset.ids), np.asarray(dataset.offsets)
    out = []
    for lo in offsets[:-1]:
        head = [tokens[i] for i in ids[lo:lo + 12].tolist()]  # <bos> stability n:k elements...
        out.append("-".join(sorted(head[3:3 + int(head[2][2:])])))
    return out


def collate(
    batch: list[tuple[torch.Tensor, torch.Tensor]], pad_token_id: int,
    features: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ids with `pad_token_id`, values with NaN. With `features`
    (ids -> (T, F) array, e.g. the running composition), also `composition`, zero-padded."""
    t = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), t), pad_token_id, dtype=torch.long)
    input_values = torch.full((len(batch), t), float("nan"), dtype=torch.float32)
    for row, (ids, values) in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        input_values[row, : len(values)] = values
    out = {"input_ids": input_ids, "input_values": input_values}
    if features is not None:
        rows = [features(ids.numpy()) for ids, _ in batch]
        composition = torch.zeros((len(batch), t, rows[0].shape[1]), dtype=torch.float32)
        for row, f in enumerate(rows):
            composition[row, : len(f)] = torch.from_numpy(f)
        out["composition"] = composition
    return out
