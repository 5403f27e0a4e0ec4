"""Round trip, speed and failures of the tokenizer on a structure file.

    python benchmarks/tokenizer.py --data ../shared/datasets/mp/mp_structures.csv.gz [--limit N] [--workers K]

Each worker runs single-threaded, so encode_ms/decode_ms are per structure on one core.
Round trip: pymatgen StructureMatcher() with default tolerances between decode(encode(s)) and s.
pymatgen's primitive-cell reduction misses a few conventional cells (e.g. Cs2TlTlI6), so a pair
it rejects is compared again with attempt_supercell=True, same tolerances; both rates are given.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from multiprocessing import Pool

import numpy as np

_STATE: dict = {}


def _init() -> None:
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from wyckoffgpt import CrystalTokenizer

    _STATE.update(tok=CrystalTokenizer(), sm=StructureMatcher(), sm_super=StructureMatcher(attempt_supercell=True))


def check(rec) -> dict:
    from wyckoffgpt.structure_io import parse_structure

    out = {"key": rec.key}
    try:
        s = parse_structure(rec)
    except ValueError as exc:
        return {**out, "status": "unreadable", "reason": str(exc)}
    tok = _STATE["tok"]
    try:
        t0 = time.perf_counter()
        seq = tok.encode(s)
        t1 = time.perf_counter()
        s2 = tok.decode(seq)
        t2 = time.perf_counter()
    except Exception as exc:  # every failure is reported with its reason, none aborts the run
        return {**out, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    sg = next(t for t in seq.tokens if t.startswith("sg:"))
    out.update(encode_ms=1e3 * (t1 - t0), decode_ms=1e3 * (t2 - t1), p1=sg == "sg:1")
    strict = _STATE["sm"].fit(s, s2)
    if strict or _STATE["sm_super"].fit(s, s2):
        return {**out, "status": "ok", "strict": strict}
    return {**out, "status": "failed", "strict": False, "reason": f"decoded crystal does not match ({sg})"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    from wyckoffgpt.structure_io import iter_records

    with Pool(args.workers, initializer=_init) as pool:
        rows = list(pool.imap(check, iter_records(args.data, args.limit), chunksize=16))
    timed = [r for r in rows if "encode_ms" in r]
    non_p1 = [r for r in timed if not r["p1"]] + [r for r in rows if r["status"] == "failed" and "encode_ms" not in r]
    ok = [r for r in non_p1 if r["status"] == "ok"]
    failures = [{"key": r["key"], "reason": r["reason"]} for r in rows if r["status"] != "ok"]
    print(json.dumps({
        "n": len(rows),
        "p1": sum(r["p1"] for r in timed),
        "non_p1": len(non_p1),
        "unreadable": sum(r["status"] == "unreadable" for r in rows),
        "roundtrip_rate": len(ok) / max(len(non_p1), 1),
        "roundtrip_rate_strict_default_matcher": sum(r.get("strict", False) for r in non_p1) / max(len(non_p1), 1),
        "median_encode_ms": float(np.median([r["encode_ms"] for r in timed])),
        "median_decode_ms": float(np.median([r["decode_ms"] for r in timed])),
        "failures": failures,
    }))


if __name__ == "__main__":
    main()
