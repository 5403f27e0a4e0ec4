"""Tokenize a set of crystal structures into a training dataset.

    python data_prep/prepare.py --input X --out DIR [--limit N] [--workers K] [--seed S]
                                [--split random|system] [--val-fraction F] [--test-fraction F]

X is a CSV with a `cif` column (optional `e_above_hull`, `material_id`), a folder of .cif files,
or an extxyz file. Every core is used (--workers, default all). Rows that cannot be used are
skipped and counted by reason, never fatal. DIR receives the memory-mapped dataset
(wyckoffgpt.data layout) and report.json, also printed.

Splits (seeded): `random` (default) shuffles structures into train/val (90/10; a test split only
with --test-fraction). `system` keeps whole chemical systems (the exact element set, e.g. Al-Ca-Cu)
out of training: systems are shuffled and dealt to test, then val, separately for each number of
elements, until each holds its fraction (default 10 % each) of that arity's structures, so unaries,
binaries, ternaries and quaternaries are all represented; structure prediction and novelty can then
be measured on chemistries the model has never seen.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from wyckoffgpt.atomic import atomic_write
from wyckoffgpt.data import write_dataset
from wyckoffgpt.structure_io import InputError, iter_records, parse_structure
from wyckoffgpt.symmetry import EncodeError
from wyckoffgpt.tokenizer import STABILITY_THRESHOLD, CrystalTokenizer

_TOKENIZER: CrystalTokenizer | None = None
_OPTS: dict = {}


def _init(symprec: float, max_sites: int, keep_p1: bool, stability_threshold: float) -> None:
    global _TOKENIZER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _TOKENIZER = CrystalTokenizer(symprec=symprec, stability_threshold=stability_threshold)
    _OPTS.update(max_sites=max_sites, keep_p1=keep_p1)


def _skip_reason(exc: Exception) -> str:
    text = str(exc)
    for marker, reason in [("unreadable CIF", "unreadable CIF"), ("not in the vocabulary", "unknown element"),
                           ("partial occupancies", "disordered"), ("no symmetry", "no symmetry found"),
                           ("elements, more than", "too many elements"), ("no atoms", "empty structure")]:
        if marker in text:
            return reason
    return f"encode error: {text[:80]}"


def process(rec) -> tuple[str, object]:
    """('ok', (key, ids, values, n_sites, space group, stability token)) or ('skip', reason)."""
    try:
        structure = parse_structure(rec)
        seq = _TOKENIZER.encode(structure, rec.e_above_hull)
    except (ValueError, EncodeError) as exc:
        return "skip", _skip_reason(exc)
    sg = int(seq.tokens[[t.startswith("sg:") for t in seq.tokens].index(True)][3:])
    if sg == 1 and not _OPTS["keep_p1"]:
        return "skip", "P1"
    n_sites = sum(t.startswith("w") for t in seq.tokens)
    if n_sites > _OPTS["max_sites"]:
        return "skip", "too many sites"
    system = "-".join(sorted(seq.tokens[3:3 + int(seq.tokens[2][2:])]))  # after <bos>, stability, n:k
    return "ok", (rec.key, seq.ids.astype(np.int16), seq.values.astype(np.float32), n_sites, sg, seq.tokens[1],
                  system)


SPLITS = ("random", "system")


def random_split(n: int, seed: int, val_fraction: float, test_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """Indices per split: a seeded shuffle of the structures (no test split when test_fraction is 0)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    splits = {"val": order[:n_val], "train": order[n_val + n_test:]}
    if n_test:
        splits["test"] = order[n_val:n_val + n_test]
    return splits


def system_split(systems: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """Indices per split with whole chemical systems in test and val: for each number of elements,
    systems in seeded random order are dealt to test, then val, until each split holds its fraction
    of that arity's structures; the rest is train."""
    rng = np.random.default_rng(seed)
    by_system: dict[str, list[int]] = {}
    for i, system in enumerate(systems):
        by_system.setdefault(system, []).append(i)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for arity in sorted({s.count("-") + 1 for s in by_system}):
        names = sorted(s for s in by_system if s.count("-") + 1 == arity)
        total = sum(len(by_system[s]) for s in names)
        want = {"test": total * test_fraction, "val": total * val_fraction}
        have = {"test": 0, "val": 0}
        for name in (names[i] for i in rng.permutation(len(names))):
            split = next((k for k in ("test", "val") if have[k] < want[k]), "train")
            out[split] += by_system[name]
            if split != "train":
                have[split] += len(by_system[name])
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items() if v or k != "test"}


def prepare(input_path: str | Path, out: str | Path, limit: int | None = None, workers: int | None = None,
            seed: int = 0, val_fraction: float = 0.1, symprec: float = 0.01, max_sites: int = 20,
            keep_p1: bool = False, progress: bool = True, split: str = "random",
            test_fraction: float | None = None, stability_threshold: float = STABILITY_THRESHOLD) -> dict:
    """Tokenize `input_path` into the dataset folder `out`; returns the report. `split`: "random"
    or "system" (see the module docstring); `test_fraction` default 0 for random, 0.1 for system.
    `stability_threshold` (eV/atom): rows with e_above_hull below it are `ehull:low`, the others
    `ehull:high`; recorded in the dataset's meta.json."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if test_fraction is None:
        test_fraction = 0.1 if split == "system" else 0.0
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError(f"fractions must be in [0, 1) with a sum below 1 (val {val_fraction}, test {test_fraction})")
    if not (math.isfinite(stability_threshold) and stability_threshold >= 0):
        raise InputError(f"stability threshold must be a number >= 0 eV/atom, got {stability_threshold}")
    from tqdm import tqdm

    records = iter_records(input_path, limit)
    # Read the first record before starting workers: an unusable file fails at once, in one line.
    first = next(records, None)
    if first is None:
        raise InputError(f"{input_path} holds no rows")
    records = itertools.chain([first], records)
    workers = workers or os.cpu_count() or 1
    kept, skipped, read = [], Counter(), 0
    stability = Counter()
    with Pool(workers, initializer=_init, initargs=(symprec, max_sites, keep_p1, stability_threshold)) as pool:
        for status, payload in tqdm(pool.imap(process, records, chunksize=32), disable=not progress,
                                    desc="tokenizing", unit="row", mininterval=1.0):
            read += 1
            if status == "ok":
                kept.append(payload)
                stability[payload[5]] += 1
            else:
                skipped[payload] += 1
    if not kept:
        raise InputError(f"no usable structure in {input_path} ({read} rows read; skipped: {dict(skipped)})")
    if split == "system":
        index = system_split([p[6] for p in kept], seed, val_fraction, test_fraction)
    else:
        index = random_split(len(kept), seed, val_fraction, test_fraction)
    splits = {k: [kept[i] for i in v] for k, v in index.items()}
    meta = {**CrystalTokenizer().vocab.model_fields(), "source": str(input_path), "seed": seed,
            "split": split, "stability_threshold": stability_threshold, "material_ids": {k: [p[0] for p in v] for k, v in splits.items()}}
    write_dataset(out, {k: [(p[1], p[2]) for p in v] for k, v in splits.items()}, meta)
    lengths = np.array([len(p[1]) for p in kept])
    edges = list(range(0, int(lengths.max()) + 11, 10))
    hist, _ = np.histogram(lengths, bins=edges)
    report = {
        "input": str(input_path), "rows_read": read, "kept": len(kept), "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped.most_common()), "split": split,
        **{k: len(v) for k, v in splits.items()},
        "structures_by_elements": {k: dict(sorted(Counter(p[6].count("-") + 1 for p in v).items()))
                                   for k, v in splits.items()},
        "systems": {k: len({p[6] for p in v}) for k, v in splits.items()},
        "stability": dict(stability), "stability_threshold": stability_threshold, "max_sites": max_sites,
        "sites_max": int(max(p[3] for p in kept)), "length_max": int(lengths.max()),
        "length_median": float(np.median(lengths)),
        "length_histogram": {f"{lo}-{lo + 9}": int(c) for lo, c in zip(edges[:-1], hist) if c},
    }
    atomic_write(Path(out, "report.json"), json.dumps(report, indent=2) + "\n")
    return report


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        print(f"prepare.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def check_arguments(args: argparse.Namespace) -> None:
    """InputError for a value out of range or an --out that cannot or must not be written, before any
    work: an earlier dataset is never overwritten."""
    for name, lowest in (("limit", 1), ("workers", 1), ("max_sites", 1), ("seed", 0)):
        value = getattr(args, name)
        if value is not None and value < lowest:
            raise InputError(f"--{name.replace('_', '-')} must be >= {lowest}, got {value}")
    if not args.symprec > 0:
        raise InputError(f"--symprec must be > 0 Å, got {args.symprec}")
    if not Path(args.input).exists():
        raise InputError(f"--input {args.input} does not exist")
    out = Path(args.out)
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir():
        raise InputError(f"cannot write to --out {out}: {existing} is a file")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"--out {out} already holds files (an earlier dataset?); choose a new or empty folder")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="CSV with a cif column, folder of .cif files, or extxyz")
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--limit", type=int, help="read at most this many rows")
    parser.add_argument("--workers", type=int, help="processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--split", choices=SPLITS, default="random",
                        help="random (default): structures shuffled; system: whole chemical systems held out in "
                             "val and test, in proportion for each number of elements")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of structures in val (default 0.1)")
    parser.add_argument("--test-fraction", type=float,
                        help="share of structures in test (default: 0.1 with --split system, else 0: no test split)")
    parser.add_argument("--symprec", type=float, default=0.01, help="spglib tolerance, Å")
    parser.add_argument("--max-sites", type=int, default=20, help="skip crystals with more Wyckoff sites")
    parser.add_argument("--keep-p1", action="store_true", help="keep structures without symmetry (P1)")
    parser.add_argument("--stability-threshold", type=float, default=STABILITY_THRESHOLD, metavar="EV",
                        help="e_above_hull (eV/atom) below which a row is ehull:low, at or above ehull:high "
                             f"(default {STABILITY_THRESHOLD})")
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        report = prepare(args.input, args.out, args.limit, args.workers, args.seed, val_fraction=args.val_fraction,
                         symprec=args.symprec, max_sites=args.max_sites, keep_p1=args.keep_p1, split=args.split,
                         test_fraction=args.test_fraction, stability_threshold=args.stability_threshold)
    except (InputError, OSError) as exc:
        print(f"prepare.py: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
