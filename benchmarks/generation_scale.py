"""generate.py end to end as a user runs it (a fresh process, startup included): valid structures per
minute with the default second process and with --single-process, CPU seconds, peak memory. The last
line printed is one JSON object.

    python benchmarks/generation_scale.py [-n 2000] [--modes default single] [--extra ARGS...]

Each mode runs `python generate.py --elements Al Ca Cu --ehull low -n N --temperature 1.0 --seed 0`
into a fresh folder. cpu_s counts the run's processes together (user + system); peak_rss_mb is GNU time's
maximum resident set (the largest among them); the load average at the start is printed with each figure, since
on a shared machine it inflates wall times.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["--elements", "Al", "Ca", "Cu", "--ehull", "low", "--temperature", "1.0", "--seed", "0"]


def run_once(n: int, mode: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = [sys.executable, str(REPO / "generate.py"), *COMMAND, "-n", str(n), "--out", str(out), *extra]
        argv += ["--single-process"] if mode == "single" else []
        load = os.getloadavg()[0]
        usage = Path(tmp) / "usage"
        # GNU time: max resident set (KiB; the largest of the process and its workers) and CPU seconds.
        argv = ["/usr/bin/time", "-o", str(usage), "-f", "%M %U %S", *argv]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                              check=False)
        wall = time.perf_counter() - t0
        rss_kb, user, system = usage.read_text().split()[-3:]
        if proc.returncode != 0:
            raise SystemExit(f"generate.py failed: {proc.stderr.strip().splitlines()[-1:]}")
        valid = len(list(out.rglob("*.cif")))
        unique = next((line for line in proc.stdout.splitlines() if line.startswith("wrote")), "")
    return {"mode": mode, "n": n, "wall_s": round(wall, 1), "valid": valid,
            "valid_per_min": round(valid / wall * 60), "cpu_s": round(float(user) + float(system), 1),
            "peak_rss_mb": round(int(rss_kb) / 1024), "load_avg_at_start": round(load, 1), "summary": unique}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--modes", nargs="+", choices=["default", "single"], default=["default", "single"])
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more generate.py arguments")
    args = p.parse_args()
    report = {"benchmark": "generation_scale", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": []}
    for mode in args.modes:
        row = run_once(args.n, mode, args.extra)
        report["runs"].append(row)
        print(f"{mode}: {row['valid']} valid in {row['wall_s']} s = {row['valid_per_min']}/min, "
              f"{row['cpu_s']} CPU s, peak {row['peak_rss_mb']} MB (load {row['load_avg_at_start']})",
              file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
