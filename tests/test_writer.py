"""Streamed runs: a run killed with SIGKILL and resumed has exactly n rows, each index once, and the
rows an uninterrupted run has; structure files sit in shards of bounded size; a folder holding a
run is never written over."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wyckoffgpt import writer
from wyckoffgpt.generation import CrystalGenerator
from wyckoffgpt.sampling import SamplingConfig
from wyckoffgpt.writer import RunError, RunSettings, write_run

REPO = Path(__file__).resolve().parents[1]


def rows(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def cli(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "generate.py"), "--model", str(model_dir), "--elements", "Al", "Ca", "Cu",
            "-n", "120", "--batch-size", "8", "--seed", "3", "--out", str(out), *extra]


def test_killed_run_resumes_to_exactly_n_rows_as_if_never_killed(model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(model_dir, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "summary.csv").exists() and len(rows(killed)) >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    children = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(rows(killed))
    assert 20 <= before < 120

    done = subprocess.run(cli(model_dir, killed, "--resume"), env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    resumed = rows(killed)
    assert [int(r["index"]) for r in resumed] == list(range(120))

    whole = tmp_path / "whole"
    assert subprocess.run(cli(model_dir, whole), env=env, capture_output=True, check=False).returncode == 0
    assert resumed == rows(whole)
    files = sorted(p.relative_to(killed).as_posix() for p in killed.rglob("*.cif"))
    assert files == sorted(r["file"] for r in resumed if r["file"])
    # The killed run's worker process went with it.
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(c) for c in children):
        time.sleep(0.2)
    assert not any(_alive(c) for c in children)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_files_in_shards_and_an_existing_run_is_not_overwritten(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "SHARD_SIZE", 7)
    gen = CrystalGenerator.from_pretrained(model_dir, device="cpu")
    settings = RunSettings(40, elements=["Na", "Cl"], sampling=SamplingConfig(seed=1, batch_size=16))
    counts = write_run(gen, settings, tmp_path / "run", worker=False)
    assert counts.sampled == 40 and counts.valid == sum(1 for r in rows(tmp_path / "run") if r["file"])
    shards = [p for p in (tmp_path / "run").iterdir() if p.is_dir()]
    assert shards and all(len(list(p.iterdir())) <= 7 for p in shards)
    before = (tmp_path / "run" / "summary.csv").read_bytes()
    with pytest.raises(RunError, match="already holds a run"):
        write_run(gen, settings, tmp_path / "run", worker=False)
    with pytest.raises(RunError, match="seed differs"):
        write_run(gen, RunSettings(40, elements=["Na", "Cl"], sampling=SamplingConfig(seed=2, batch_size=16)),
                  tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "summary.csv").read_bytes() == before


def test_worker_process_gives_the_same_rows(model_dir, tmp_path):
    gen = CrystalGenerator.from_pretrained(model_dir, device="cpu")
    settings = {"n": 24, "elements": ["Al", "Ca", "Cu"], "seed": 4, "batch_size": 8}
    write_run(gen, RunSettings.from_dict(settings), tmp_path / "inline", worker=False)
    write_run(gen, RunSettings.from_dict(settings), tmp_path / "worker", worker=True)
    assert rows(tmp_path / "inline") == rows(tmp_path / "worker")


def test_parts_of_several_processes_merge_into_the_one_process_summary(model_dir, tmp_path):
    from wyckoffgpt.writer import Share

    gen = CrystalGenerator.from_pretrained(model_dir, device="cpu")
    settings = {"n": 30, "elements": ["Na", "Cl"], "seed": 6, "batch_size": 4}
    write_run(gen, RunSettings.from_dict(settings), tmp_path / "one", worker=False, share=Share(0, 1))
    # What torchrun --nproc_per_node 3 does, one rank after the other; rank 0 merges.
    for rank in (2, 1, 0):
        write_run(gen, RunSettings.from_dict(settings), tmp_path / "three", worker=False, share=Share(rank, 3))
    assert rows(tmp_path / "three") == rows(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "three").iterdir() if p.is_file()) == ["run.json", "summary.csv"]


def test_merge_decides_duplicates_again_across_parts_instead_of_keeping_a_ranks_verdict(model_dir, tmp_path):
    # Equality within tolerances is not transitive, so a rank's own duplicate verdict can differ from
    # the one-process verdict; the merge must give the one-process summary whatever a part says.
    from wyckoffgpt.writer import Share

    gen = CrystalGenerator.from_pretrained(model_dir, device="cpu")
    settings = {"n": 16, "elements": ["Na", "Cl"], "seed": 6, "batch_size": 4}
    write_run(gen, RunSettings.from_dict(settings), tmp_path / "one", worker=False, share=Share(0, 1))
    write_run(gen, RunSettings.from_dict(settings), tmp_path / "two", worker=False, share=Share(1, 2))
    part = tmp_path / "two" / Share(1, 2).part
    with open(part, newline="") as f:
        part_rows = list(csv.DictReader(f))
    unique = next(r for r in part_rows if r["file"] and "duplicate" not in r["flags"])
    unique["flags"] = "duplicate"  # a verdict the one-process run does not reach
    with open(part, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(part_rows[0]))
        w.writeheader()
        w.writerows(part_rows)
    write_run(gen, RunSettings.from_dict(settings), tmp_path / "two", worker=False, share=Share(0, 2))
    assert rows(tmp_path / "two") == rows(tmp_path / "one")


def test_a_part_prepared_by_the_sampler_gets_the_rows_the_worker_gives(model_dir, tmp_path):
    # The sampler, with nothing left to draw, prepares the last parts (canonical forms computed at
    # once, sent through a pipe) and the worker only puts them through the duplicate index.
    import pickle

    from wyckoffgpt.duplicates import DuplicateIndex

    gen = CrystalGenerator.from_pretrained(model_dir, device="cpu")
    settings = RunSettings.from_dict({"n": 16, "elements": ["Al", "Ca", "Cu"], "seed": 5, "batch_size": 16})
    batch = next(gen.iter_batches(16, elements=["Al", "Ca", "Cu"], config=settings.sampling))
    batch = batch + [s._replace(index=s.index + 16) for s in batch]  # each crystal twice: the second a duplicate
    finishers = {}
    for name in ("worker", "sampler"):
        (tmp_path / name).mkdir()
        finishers[name] = writer._Finisher(gen.vocab, settings, tmp_path / name, DuplicateIndex(vocab=gen.vocab))
    by_worker = finishers["worker"](batch)
    prepared = pickle.loads(pickle.dumps(finishers["sampler"].prepare(batch, forms=True)))
    by_sampler = [finishers["sampler"].commit(*item) for item in prepared]
    assert by_sampler == by_worker
    assert sum("duplicate" in r["flags"] for r in by_worker) >= sum(bool(r["file"]) for r in by_worker) / 2
