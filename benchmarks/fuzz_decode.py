"""Fuzz the decoder: random and mutated sequences must raise DecodeError or decode, nothing else.

    python benchmarks/fuzz_decode.py [--n 100000] [--seed 0]

Prints one JSON line last: n, decoded, rejected, crashes (must be 0), slowest_ms.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from wyckoffgpt import CrystalTokenizer
from wyckoffgpt.fuzzing import fuzz_decode
from wyckoffgpt.structure_io import iter_records, parse_structure

SLICE = Path(__file__).resolve().parent.parent / "tests" / "data" / "mp_slice.csv.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    tok = CrystalTokenizer()
    seeds = [tok.encode(parse_structure(r)) for r in iter_records(SLICE, limit=100)]
    print(json.dumps(fuzz_decode(tok, seeds, args.n, args.seed)))


if __name__ == "__main__":
    main()
