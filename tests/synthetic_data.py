"""A synthetic vocabulary and Wyckoff-like token sequences for model and training tests.

Not real crystallography: a fixed little grammar (bos, stability, elements, space group, Wyckoff sites
with coordinates, three lengths, three angles, eos) whose values depend on earlier tokens, so a model
can learn it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wyckoffgpt.data import write_dataset

PAD, BOS, EOS = 0, 1, 2
COORDS = [10, 11, 12]  # x, y, z
LENGTHS = [13, 14, 15]  # a, b, c
ANGLES = [16, 17, 18]  # alpha, beta, gamma
VOCAB = {
    "vocab_hash": "synthetic-v1",
    "vocab_size": 64,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "coord_token_ids": COORDS,
    "length_token_ids": LENGTHS,
    "angle_token_ids": ANGLES,
}


def make_sequence(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ids, vals = [BOS, int(rng.integers(3, 5))], [np.nan, np.nan]
    for _ in range(int(rng.integers(1, 4))):  # elements
        ids.append(int(rng.integers(20, 30)))
        vals.append(np.nan)
    group = int(rng.integers(40, 44))
    ids.append(group)
    vals.append(np.nan)
    for _ in range(int(rng.integers(1, 3))):  # Wyckoff sites, some with free coordinates
        site = int(rng.integers(50, 56))
        ids.append(site)
        vals.append(np.nan)
        for axis in range(site % 3):
            ids.append(COORDS[axis])
            # Coordinates near the cell edge on purpose: the density must wrap around 0 = 1.
            vals.append(float((0.15 * (site - 50) + 0.9 + 0.01 * rng.normal()) % 1.0))
    base = 3.0 + (group - 40) * 1.5
    for tok in LENGTHS:
        ids.append(tok)
        vals.append(float(base * np.exp(0.05 * rng.normal())))
    for tok in ANGLES:
        ids.append(tok)
        vals.append(120.0 if (group == 43 and tok == ANGLES[2]) else 90.0 + 0.5 * rng.normal())
    ids.append(EOS)
    vals.append(np.nan)
    return np.array(ids, dtype=np.int64), np.array(vals, dtype=np.float32)


def make_sequences(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [make_sequence(rng) for _ in range(n)]


def write_synthetic_dataset(path: Path, n_train: int = 64, n_val: int = 16, seed: int = 0) -> Path:
    write_dataset(path, {"train": make_sequences(n_train, seed), "val": make_sequences(n_val, seed + 1)}, VOCAB)
    return path
