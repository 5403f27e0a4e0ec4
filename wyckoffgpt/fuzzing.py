"""Random and mutated token sequences for checking that decode fails only with DecodeError.

Pure random ids almost always fail at the first token, so most cases mutate valid sequences
(replace, insert, delete or truncate tokens; set values to NaN, ±inf, 0, negatives or huge
numbers), which drives the decoder deep into the grammar and the lattice/orbit code.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .grammar import DecodeError
from .tokenizer import CrystalSequence, CrystalTokenizer

_ODD_VALUES = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e300, -1e300, 1e-300, 179.9999, 180.0, 1.0, 0.5]


def random_case(rng: np.random.Generator, seeds: list[CrystalSequence], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    if rng.random() < 0.2 or not seeds:
        n = int(rng.integers(0, 120))
        ids = rng.integers(-3, vocab_size + 3, size=n)
        values = rng.choice([*_ODD_VALUES, *rng.normal(0, 10, 8)], size=n)
        return ids, values
    base = seeds[int(rng.integers(len(seeds)))]
    ids, values = base.ids.copy(), base.values.copy()
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(5)
        i = int(rng.integers(max(len(ids), 1)))
        if op == 0 and len(ids):
            ids[i] = rng.integers(0, vocab_size)
        elif op == 1:
            ids = np.insert(ids, i, rng.integers(0, vocab_size))
            values = np.insert(values, i, rng.choice(_ODD_VALUES))
        elif op == 2 and len(ids):
            ids, values = np.delete(ids, i), np.delete(values, i)
        elif op == 3:
            ids, values = ids[:i], values[:i]
        elif len(values):
            values[i] = rng.choice(_ODD_VALUES) if rng.random() < 0.5 else rng.normal(values[i], 50)
    return ids, values


def fuzz_decode(tokenizer: CrystalTokenizer, seeds: list[CrystalSequence], n: int, seed: int = 0) -> dict:
    """Decode n cases; returns counts and the first crashes (exceptions other than DecodeError)."""
    rng = np.random.default_rng(seed)
    decoded = rejected = 0
    crashes: list[str] = []
    slowest = 0.0
    for _ in range(n):
        ids, values = random_case(rng, seeds, len(tokenizer.vocab))
        t0 = time.perf_counter()
        try:
            seq = CrystalSequence.from_ids(ids, values, tokenizer.vocab)
            tokenizer.decode(seq)
            decoded += 1
        except DecodeError:
            rejected += 1
        except Exception as exc:  # the point of the fuzzer: any other exception is a bug
            crashes.append(f"{type(exc).__name__}: {exc} | ids={ids.tolist()} values={values.tolist()}")
        slowest = max(slowest, time.perf_counter() - t0)
    return {"n": n, "decoded": decoded, "rejected": rejected, "crashes": len(crashes),
            "slowest_ms": 1e3 * slowest, "first_crashes": crashes[:5]}
