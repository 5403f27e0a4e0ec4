"""What the benchmarks that generate for held-out structures share (csp.py, recovery.py): the held-out
records of a prepared dataset's split, read again from its input by material id; the matcher's
tolerances; a generator in each worker of a multiprocessing pool."""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path

from pymatgen.core import Structure

from wyckoffgpt.atomic import atomic_write
from wyckoffgpt.data import DatasetError, load_meta, split_systems
from wyckoffgpt.sampling import ANALOGUE_SOURCES, SamplingConfig
from wyckoffgpt.structure_io import InputError, Record, read_records

MATCHER_SETTINGS = {"ltol": 0.3, "stol": 0.5, "angle_tol": 10}  # DiffCSP's, and the Matra-Genoa paper's

_GENERATOR = None


def split_records(data_dir: Path, input_path: Path, split: str) -> list[tuple[str, str, Record]]:
    """(material id, chemical system, record) of each structure of the split that --input still holds.
    InputError (one line) when the dataset has no material ids for the split."""
    try:
        ids = load_meta(data_dir).get("material_ids", {}).get(split)
    except DatasetError as exc:
        raise InputError(str(exc)) from None
    if ids is None:
        raise InputError(f"{data_dir} has no material ids for split {split!r}")
    records = read_records(input_path, ids)
    return [(key, system, records[key]) for key, system in zip(ids, split_systems(data_dir, split))
            if key in records]


def init_worker(model: str | None) -> None:
    """Pool initializer: one generator per worker process, on one CPU thread (the workers share the cores)."""
    global _GENERATOR
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    from wyckoffgpt.generation import CrystalGenerator

    _GENERATOR = CrystalGenerator.from_pretrained(model, device="cpu", cpu_threads=1)


def run_jobs(fn: Callable, jobs: Iterable, workers: int, model: str | None, ordered: bool = True) -> Iterator:
    """fn over the jobs with a generator per worker: in `workers` pool processes, or in this one when
    workers is 1. ordered=False yields each result as it is ready."""
    if workers == 1:
        init_worker(model)
        yield from map(fn, jobs)
        return
    with Pool(workers, initializer=init_worker, initargs=(model,)) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(fn, jobs)


def add_analogue_arguments(parser) -> None:
    """--analogues K and --analogue-share F: SamplingConfig.analogues / analogue_share for every sample."""
    parser.add_argument("--analogues", type=int, default=SamplingConfig.analogues, metavar="K",
                        help="draw --analogue-share of the samples in analogue systems (SamplingConfig.analogues; "
                             "default 0: off)")
    parser.add_argument("--analogue-share", type=float, default=SamplingConfig.analogue_share, metavar="F",
                        help=f"SamplingConfig.analogue_share (default {SamplingConfig.analogue_share})")
    parser.add_argument("--analogue-source", choices=ANALOGUE_SOURCES, default=SamplingConfig.analogue_source,
                        help="SamplingConfig.analogue_source: 'sampled' (default) or 'known' skeletons of the "
                             "model's training crystals in the analogue systems")
    parser.add_argument("--analogue-substitutions", type=int, default=SamplingConfig.analogue_substitutions,
                        metavar="S", help="SamplingConfig.analogue_substitutions: elements an analogue replaces at "
                                          "once, at most (default 1)")
    parser.add_argument("--analogue-repeats", type=int, default=SamplingConfig.analogue_repeats, metavar="R",
                        help="SamplingConfig.analogue_repeats: samples per analogue at most (default: no cap)")
    parser.add_argument("--analogue-templates", action="store_true",
                        help="SamplingConfig.analogue_templates: each known skeleton's first sample is its "
                             "neighbour's crystal with the elements put back")


def analogue_settings(args) -> dict:
    """The sampling overrides of `add_analogue_arguments`, checked by SamplingConfig (InputError)."""
    settings = {"analogues": args.analogues, "analogue_share": args.analogue_share,
                "analogue_source": args.analogue_source, "analogue_repeats": args.analogue_repeats,
                "analogue_substitutions": args.analogue_substitutions, "analogue_templates": args.analogue_templates}
    SamplingConfig(**settings)
    return settings


def worker_generator():
    """The generator `init_worker` loaded in this process."""
    return _GENERATOR


def matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**MATCHER_SETTINGS)


def rms_distance(matcher, candidate: Structure, target: Structure) -> float | None:
    """StructureMatcher's normalised RMS displacement between the two, or None when they do not match
    (or the matcher fails numerically on the pair)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = matcher.get_rms_dist(candidate, target)
        except (ValueError, ArithmeticError):
            return None
    return None if out is None else float(out[0])


def emit(report: dict, rows: object, out: Path | None) -> None:
    """The report with its rows to --out (atomically), then the report as the last line of stdout."""
    if out is not None:
        atomic_write(out, json.dumps({**report, "rows": rows}, indent=1) + "\n")
    print(json.dumps(report))
