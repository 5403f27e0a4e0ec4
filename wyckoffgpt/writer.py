"""Generation runs streamed to a folder in constant memory, resumable after a kill.

    settings = RunSettings(n=2000, elements=["Al", "Ca", "Cu"], ehull="low", sampling=SamplingConfig(seed=0))
    counts = write_run(generator, settings, "out/")

The folder holds `run.json` (the settings, one key each, written first), `summary.csv` (one row per sample, in
index order, flushed as it is made) and the structure files of the valid samples in shards,
subfolders of at most SHARD_SIZE files (`0000/00012_CaAlCu_sg191.cif`). Memory holds only the
duplicate index (`duplicates.DuplicateIndex`, grown one structure at a time) and counters.

Both cores: the main process samples (the model) while one worker process decodes, filters,
writes the structure files and keeps the duplicate index, a batch behind, and hands back the rows;
whenever the worker has nothing to finish it draws the next batch itself, and once nothing is left
to draw the main process prepares the last batches' parts (all but the duplicate index) from the
end (`_Claims`), so neither core waits for the other. The rows do not depend on which process drew
or prepared what.

Resume: batch b is drawn from its own random stream (`generation.batch_seed`), so a run killed at
any point continues with `resume=True` from the rows it had written: the summary is cut back to
its last complete row, the duplicate index is rebuilt from the written rows' sequences, and the
missing indices are drawn again, giving the rows an uninterrupted run gives.
"""
from __future__ import annotations

import csv
import ctypes
import ctypes.util
import heapq
import io
import json
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pymatgen.core import Structure

from .atomic import atomic_write
from .duplicates import DuplicateIndex
from .generation import CrystalGenerator, GeneratedCrystal, Sample, finish_sample
from .sampling import FIELD_NAMES, SamplingConfig, check_num_samples
from .tokenizer import CrystalSequence, CrystalTokenizer
from .vocab import Vocab

SHARD_SIZE = 1000  # structure files per subfolder
MAX_AHEAD = 4  # batches the sampler hands the worker before it waits for their rows
PARTS = 8  # a batch is finished in this many parts, so that the two processes' shares meet closely
FORMATS = {"cif": ".cif", "extxyz": ".extxyz", "json": ".json"}
CSV_FIELDS = ["index", "file", "formula", "reduced_formula", "requested_spacegroup", "detected_spacegroup",
              "num_sites", "density", "min_distance", "charge_balanced", "flags", "retries", "temperature", "sequence"]
SETTINGS_FILE = "run.json"
SUMMARY_FILE = "summary.csv"


class RunError(ValueError):
    """Settings out of range, or a folder that cannot take this run (it holds another run, or a
    resume asks for other settings); the one-line message says which."""


@dataclass
class RunSettings:
    """Everything that decides a run's samples: how many (`n`), what (the conditions, see
    `CrystalGenerator.generate`), how (`sampling`, a `SamplingConfig`; None: the model's
    recommended settings, `CrystalGenerator.sampling_defaults`), and the file format.
    `sampling.seed` None: drawn at the start and recorded in run.json."""

    n: int
    elements: list[str] | None = None
    ehull: str | None = None
    spacegroup: int | None = None
    formula: str | None = None  # exact conditions: see CrystalGenerator.generate
    formula_units: list[int] | None = None
    wyckoff: str | None = None
    complete_sites: bool = False
    prompt: str | None = None
    sampling: SamplingConfig | None = None
    format: str = "cif"
    model: str | None = None  # as given (folder or Hub id); recorded, not used here

    def __post_init__(self) -> None:
        # The generator's own checks (InputError; SamplingConfig checks itself); the format is the writer's.
        check_num_samples(self.n)
        if self.sampling is not None and not isinstance(self.sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        if self.format not in FORMATS:
            raise RunError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.formula_units is not None:
            self.formula_units = [int(k) for k in self.formula_units]  # a list, as run.json records it

    def conditions(self) -> dict:
        """What to generate, as `CrystalGenerator.iter_batches` keywords."""
        return {"elements": self.elements, "ehull": self.ehull, "spacegroup": self.spacegroup,
                "formula": self.formula, "formula_units": self.formula_units, "wyckoff": self.wyckoff,
                "complete_sites": self.complete_sites, "prompt": self.prompt}

    def to_dict(self) -> dict:
        """One key per setting (the sampling settings beside the others), as run.json holds them."""
        return {"n": self.n, **self.conditions(), **self.sampling.to_dict(), "format": self.format, "model": self.model}

    @classmethod
    def from_dict(cls, data: dict) -> RunSettings:
        """The settings `to_dict` gives (a sampling setting missing: its default)."""
        data = dict(data)
        sampling = SamplingConfig(**{k: data.pop(k) for k in FIELD_NAMES if k in data})
        return cls(**data, sampling=sampling)


@dataclass
class RunCounts:
    """Tallies of a run's rows, for the printed summary."""

    sampled: int = 0
    decoded: int = 0
    placed: int = 0  # decoded and passed the distance filter
    balanced: int = 0  # of those, charge-balanced (SMACT)
    unbalanced: int = 0  # failed the charge check in force (not written)
    retried: int = 0
    retries: int = 0
    valid: int = 0  # written
    consistent: int = 0  # written, space group as stated
    unique: int = 0  # written, no earlier duplicate

    def add(self, row: dict) -> None:
        flags = row["flags"].split(":")[0].split("|") if row["flags"] else []
        self.sampled += 1
        self.decoded += bool(row["formula"])
        placed = bool(row["formula"]) and "too_close" not in flags
        self.placed += placed
        self.balanced += placed and row["charge_balanced"] == "true"
        self.unbalanced += placed and "not_charge_balanced" in flags
        self.retried += int(row["retries"]) > 0
        self.retries += int(row["retries"])
        self.valid += bool(row["file"])
        self.consistent += bool(row["file"]) and "spacegroup_mismatch" not in flags
        self.unique += bool(row["file"]) and "duplicate" not in flags


def structure_text(structure: Structure, fmt: str) -> str:
    if fmt == "cif":
        from pymatgen.io.cif import CifWriter

        return str(CifWriter(structure))
    if fmt == "json":
        return json.dumps(structure.as_dict())
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    buf = io.StringIO()
    write(buf, AseAtomsAdaptor.get_atoms(structure), format="extxyz")
    return buf.getvalue()


def structure_file(result: GeneratedCrystal, fmt: str) -> str:
    """Path of a valid result's file inside the run folder: its shard, then index, formula, group."""
    return (f"{result.index // SHARD_SIZE:04d}/{result.index:05d}_{result.structure.composition.reduced_formula}"
            f"_sg{result.spacegroup}{FORMATS[fmt]}")


def write_structure(out: Path, result: GeneratedCrystal, fmt: str) -> str:
    """Write a valid result's file into its shard of `out`; its path in the folder, "" if not valid."""
    if not result.valid:
        return ""
    file = structure_file(result, fmt)
    (out / file).parent.mkdir(exist_ok=True)
    atomic_write(out / file, structure_text(result.structure, fmt))
    return file


def write_results(results: Iterable[GeneratedCrystal], out: str | os.PathLike, fmt: str = "cif") -> RunCounts:
    """Finished results (duplicates already flagged, e.g. a sweep's) written as a run folder holds
    them: structure files in shards and summary.csv, in the order given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = RunWriter(out)
    try:
        for r in results:
            writer.write(summary_row(r, write_structure(out, r, fmt)))
    finally:
        writer.close()
    return writer.counts


AMU_PER_A3_IN_G_PER_CM3 = 1.66053906660  # 1 amu/Å³ in g/cm³


def summary_row(r: GeneratedCrystal, file: str) -> dict:
    s = r.structure
    # One Composition for all columns (Structure.composition builds a new one on every access, and
    # Structure.density converts units through pymatgen's unit objects: half a millisecond a row).
    comp = s.composition if s is not None else None
    return {
        "index": r.index, "file": file,
        "formula": comp.formula.replace(" ", "") if s is not None else "",
        "reduced_formula": comp.reduced_formula if s is not None else "",
        "requested_spacegroup": r.spacegroup if r.spacegroup is not None else "",
        "detected_spacegroup": r.detected_spacegroup if r.detected_spacegroup is not None else "",
        "num_sites": len(s) if s is not None else "",
        "density": f"{comp.weight * AMU_PER_A3_IN_G_PER_CM3 / s.volume:.4f}" if s is not None else "",
        "min_distance": f"{r.min_distance:.4f}" if r.min_distance is not None else "",
        "charge_balanced": "" if r.charge_balanced is None else str(r.charge_balanced).lower(),
        "flags": "|".join(r.flags) + (f": {r.error}" if r.error else ""),
        "retries": r.retries,
        "temperature": r.temperature, "sequence": str(r.sequence),
    }


# -- the worker's side: decode, filter, write the file, flag duplicates -------------------------------

class _Finisher:
    """Turns sampled sequences into summary rows and files, flagging duplicates as it goes (batches
    arrive in index order, so "earlier" means a lower index). Two steps: `prepare` (everything but
    the duplicate index, in any process and order) and `commit` (the index, in index order)."""

    def __init__(self, vocab: Vocab, settings: RunSettings, out: Path, index: DuplicateIndex):
        self.tokenizer = CrystalTokenizer(vocab)
        self.settings, self.out, self.index = settings, out, index

    def __call__(self, batch: list[Sample]) -> list[dict]:
        return [self.commit(*item) for item in self.prepare(batch)]

    def prepare(self, batch: list[Sample], forms: bool = False) -> list[tuple]:
        """Per sample: its summary row (no duplicate flag yet), and for a valid one its structure,
        spglib dataset and, with `forms`, its canonical form (else the index computes one only when
        the formula repeats); the structure file is written."""
        s = self.settings
        prepared = []
        for sample in batch:
            r = finish_sample(self.tokenizer, sample, s.sampling)
            file = write_structure(self.out, r, s.format)
            # The filter's spglib call serves the duplicate index too when both use one tolerance.
            known = r.symmetry if file and s.sampling.symprec == self.index.symprec else None
            form = self.index.form(r.structure, known) if file and forms else None
            r.symmetry = None
            prepared.append((summary_row(r, file), r.structure if file else None, None if forms else known, form))
        return prepared

    def commit(self, row: dict, structure: Structure | None, known, form) -> dict:
        """The row, flagged "duplicate" when its crystal matches an earlier one in the index."""
        if row["file"] and self.index.add(structure, row["index"], form=form, known_dataset=known) is not None:
            row["flags"] = f"{row['flags']}|duplicate" if row["flags"] else "duplicate"
        return row


WORKER, SAMPLER = 1, 2  # who finishes a batch


class _Claims:
    """The batches still to draw, handed out in order to whichever process asks first: the sampler,
    or the worker when it has nothing to finish (so both cores sample when finishing is the lighter
    side). Any process can draw any batch (its own random stream), so who draws it does not change
    the rows. Likewise who finishes each batch: the worker from the first, the sampler, once
    nothing is left to draw, from the last it drew, until they meet."""

    def __init__(self, context, total: int):
        self.total = total
        self._next = context.Value("i", 0)
        self._finisher = context.Array("b", total * PARTS, lock=self._next.get_lock())

    def claim(self) -> int | None:
        """Position in the run's batch list of the next batch to draw, or None when all are taken."""
        with self._next.get_lock():
            k = self._next.value
            if k >= self.total:
                return None
            self._next.value = k + 1
            return k

    def finish(self, unit: int, who: int) -> bool:
        """Whether `who` (WORKER or SAMPLER) finishes `unit`, part unit % PARTS of the batch at
        position unit // PARTS (the first to ask does)."""
        with self._next.get_lock():
            if self._finisher[unit] == 0:
                self._finisher[unit] = who
            return self._finisher[unit] == who


def _part(batch: list, part: int) -> list:
    """The part-th of a batch's PARTS consecutive slices (the unit of finishing)."""
    return batch[len(batch) * part // PARTS:len(batch) * (part + 1) // PARTS]


def _worker_loop(draw: Callable[[int], list] | None, todo: list[int], claims: _Claims, finisher_args: tuple,
                 inbox, outbox, parent: int) -> None:
    """The worker process: finish the batches in index order (the duplicate index sees them in
    order), each drawn by the sampler (arriving in `inbox`) or, while the next one in order is not
    there yet, by itself (`draw`; None: it only finishes); a part the sampler finished arrives
    prepared and only goes through the index. One message per part in `outbox`."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        finish = _Finisher(*finisher_args)
        got: dict[tuple[str, int], list] = {}
        for unit in range(len(todo) * PARTS):
            k, part = divmod(unit, PARTS)
            need = ("drawn", k) if claims.finish(unit, WORKER) else ("prepared", unit)
            while need not in got:
                j = claims.claim() if draw is not None and inbox.empty() else None
                if j is not None:
                    got["drawn", j] = draw(todo[j])
                else:
                    kind, position, payload = inbox.get()
                    got[kind, position] = payload
            if need[0] == "drawn":
                rows = finish(_part(got[need], part))
            else:
                rows = [finish.commit(*item) for item in got.pop(need)]
            if part == PARTS - 1:
                got.pop(("drawn", k), None)
            outbox.put(("rows", rows))
    except BaseException as e:  # handed to the sampler, which raises it
        outbox.put(("error", e))


def _exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    # A killed sampler (SIGKILL: no cleanup runs) would leave its worker waiting for work forever.
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


# -- the main process's side -------------------------------------------------------------------------

class RunWriter:
    """summary.csv rows, in index order, each flushed as it is written."""

    def __init__(self, out: Path, resume: bool = False, vocab: Vocab | None = None, name: str = SUMMARY_FILE):
        self.out = Path(out)
        self.index = DuplicateIndex(vocab=vocab)  # of the rows written, for the finisher to go on with
        self.counts = RunCounts()
        self.done: set[int] = set()
        summary = self.out / name
        if resume:
            self._reload(summary, vocab)
        self._file = open(summary, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
        if not self.done:
            self._file.truncate(0)
            self._csv.writeheader()
            self._file.flush()

    def _reload(self, summary: Path, vocab: Vocab | None) -> None:
        if not summary.exists():
            return
        data = summary.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]  # a kill mid-row leaves a partial last line
        if len(complete) != len(data):
            with open(summary, "r+b") as f:
                f.truncate(len(complete))
        tokenizer = CrystalTokenizer(vocab) if vocab else CrystalTokenizer()
        for row in csv.DictReader(io.StringIO(complete.decode())):
            self.done.add(int(row["index"]))
            self.counts.add(row)
            if row["file"] and "duplicate" not in row["flags"]:
                structure = tokenizer.decode(CrystalSequence.from_string(row["sequence"], tokenizer.vocab))
                self.index.add(structure, int(row["index"]))

    def write(self, row: dict) -> None:
        self._csv.writerow(row)
        self._file.flush()
        self.counts.add(row)
        self.done.add(int(row["index"]))

    def close(self) -> None:
        self._file.close()


def _record_settings(out: Path, settings: RunSettings, resume: bool) -> RunSettings:
    """Write run.json, or on resume check the settings against it (a recorded seed fills a missing one)."""
    path = out / SETTINGS_FILE
    if resume and path.exists():
        recorded = RunSettings.from_dict(json.loads(path.read_text())).to_dict()
        given = settings.to_dict()
        if given["seed"] is None:
            given["seed"] = recorded["seed"]
        differ = [k for k, v in given.items() if v != recorded[k]]
        if differ:
            raise RunError(f"--resume: {differ[0]} differs from the run in {out} "
                           f"({given[differ[0]]!r} vs {recorded[differ[0]]!r})")
        return RunSettings.from_dict(recorded)
    atomic_write(path, json.dumps(settings.to_dict(), indent=1))
    return settings


@dataclass(frozen=True)
class Share:
    """This process's part of a run made by several (torchrun, accelerate launch: RANK, WORLD_SIZE):
    rank r draws the batches b with b % world == r, writes its files and `summary.rank{r}.csv`, and
    rank 0 merges the parts into one summary.csv, flagging duplicates across them."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Share:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def part(self) -> str:
        return SUMMARY_FILE if self.world == 1 else f"summary.rank{self.rank}.csv"


def write_run(gen: CrystalGenerator, settings: RunSettings, out: str | os.PathLike, resume: bool = False,
              worker: bool | None = None, on_finished: Callable[[int], None] | None = None,
              share: Share | None = None) -> RunCounts:
    """Sample `settings.n` crystals into folder `out` (see the module docstring). `worker`: decode,
    filter and write in a second process while this one samples, that process drawing batches too
    when it is idle (default: when more than one core is available per process). `share`: this process's part of a run made by several (default: from
    the environment torchrun sets); rank 0 returns the whole run's counts, the others their own."""
    out = Path(out)
    share = share or Share.from_env()
    if settings.sampling is None:
        settings.sampling = gen.sampling_defaults
    if share.world > 1 and (resume or settings.sampling.seed is None):
        raise RunError("a run made by several processes needs --seed (all draw from it) and cannot be resumed")
    out.mkdir(parents=True, exist_ok=True)
    held = [out / SUMMARY_FILE, out / share.part] + ([out / SETTINGS_FILE] if share.rank == 0 else [])
    if not resume and any(p.exists() for p in held):
        raise RunError(f"{out} already holds a run; resume it or choose another folder")
    conditions = settings.conditions()
    # Every check of the request, before anything is written.
    cond = gen.conditions(**{k: v for k, v in conditions.items() if k != "prompt"})
    gen.guided_config(cond, gen.prompt_prefix(settings.prompt, cond), settings.sampling)
    if settings.sampling.seed is None:
        import secrets

        settings.sampling = settings.sampling.replace(seed=secrets.randbits(63))
    if share.rank == 0:
        settings = _record_settings(out, settings, resume)
    writer = RunWriter(out, resume, gen.vocab, share.part)
    s, batch_size = settings, settings.sampling.batch_size
    n_batches = -(-s.n // batch_size)
    todo = [b for b in range(share.rank, n_batches, share.world)
            if any(i not in writer.done for i in range(b * batch_size, min((b + 1) * batch_size, s.n)))]
    if on_finished is not None and writer.done:
        on_finished(len(writer.done))
    finisher_args = (gen.vocab, s, out, writer.index)
    use_worker = default_worker(share.world) if worker is None else worker

    def draw(b: int) -> list:
        batch = next(gen.iter_batches(s.n, config=s.sampling, batches=[b], **conditions))
        release_free_memory()
        return [item for item in batch if item[0] not in writer.done]

    try:
        if use_worker:
            _run_with_worker(draw, todo, finisher_args, writer, on_finished)
        else:
            finish = _Finisher(*finisher_args)
            for batch in gen.iter_batches(s.n, config=s.sampling, batches=todo, on_finished=on_finished,
                                          **conditions):
                release_free_memory()  # as `draw` does: the run's memory the same in either mode
                for row in finish([item for item in batch if item[0] not in writer.done]):
                    writer.write(row)
    finally:
        writer.close()
    gen.last_seed = s.sampling.seed
    if share.world == 1:
        return writer.counts
    atomic_write(out / f"{share.part}.done", "")
    return merge_parts(out, share.world, gen.vocab) if share.rank == 0 else writer.counts


def merge_parts(out: Path, world: int, vocab: Vocab | None = None, poll_s: float = 0.2) -> RunCounts:
    """Rank 0: wait for every rank's finished part, then write one summary.csv in index order with
    duplicates decided across the parts (as one process would have decided them), and remove the
    parts."""
    parts = [out / Share(r, world).part for r in range(world)]
    while not all(Path(f"{p}.done").exists() for p in parts):
        time.sleep(poll_s)
    tokenizer = CrystalTokenizer(vocab) if vocab else CrystalTokenizer()
    index = DuplicateIndex(vocab=tokenizer.vocab)
    counts = RunCounts()

    def write(f) -> None:
        # Each part is in index order: a k-way merge streams them (memory: the duplicate index).
        text = io.TextIOWrapper(f, newline="")
        merged = csv.DictWriter(text, fieldnames=CSV_FIELDS)
        merged.writeheader()
        files = [open(p, newline="") for p in parts]
        try:
            for row in heapq.merge(*map(csv.DictReader, files), key=lambda r: int(r["index"])):
                if row["file"]:
                    # Decided again over all parts in index order, as one process decides: a rank's own
                    # verdict can differ (duplicate-of is not transitive within tolerances).
                    flags = [f for f in row["flags"].split("|") if f and f != "duplicate"]
                    structure = tokenizer.decode(CrystalSequence.from_string(row["sequence"], tokenizer.vocab))
                    if index.add(structure, int(row["index"])) is not None:
                        flags.append("duplicate")
                    row["flags"] = "|".join(flags)
                merged.writerow(row)
                counts.add(row)
        finally:
            for f_part in files:
                f_part.close()
        text.flush()
        text.detach()

    atomic_write(out / SUMMARY_FILE, write)
    for p in parts:
        p.unlink()
        Path(f"{p}.done").unlink()
    return counts


def _run_with_worker(draw: Callable[[int], list], todo: list[int], finisher_args: tuple, writer: RunWriter,
                     on_finished: Callable[[int], None] | None, poll_s: float = 1.0) -> None:
    """Draw batches here while one worker process finishes them (and draws batches too when it
    would otherwise wait); write the rows it hands back, in index order."""
    # fork: the worker inherits the loaded model and the imported modules instead of loading them
    # again on a busy core; it is started at once, before the sampler's first forward pass starts
    # torch's threads. Without fork (spawn), the worker only finishes.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    claims = _Claims(context, len(todo))
    # Queues with a feeder thread: a put returns at once, so the sampler never waits for the worker to
    # read a batch (a pipe holds 64 kB; a SimpleQueue blocked the sampler for seconds per batch).
    inbox, outbox = context.Queue(), context.Queue()
    proc = context.Process(target=_worker_loop, daemon=True,
                           args=(draw if method == "fork" else None, todo, claims, finisher_args, inbox, outbox,
                                 os.getpid()))
    proc.start()
    received = 0

    def receive(block: bool) -> bool:
        nonlocal received
        while True:
            try:
                kind, payload = outbox.get(timeout=poll_s) if block else outbox.get_nowait()
            except queue.Empty:
                if block and proc.is_alive():
                    continue
                if block:
                    raise RuntimeError(f"the worker process ended (exit code {proc.exitcode}) before the run was done")
                return False
            if kind == "error":
                raise payload
            for row in payload:
                writer.write(row)
            received += 1
            if on_finished is not None:
                on_finished(len(payload))
            return True

    sent = 0
    drawn_here: dict[int, list] = {}  # position -> batch, of the last MAX_AHEAD batches drawn here
    try:
        while (k := claims.claim()) is not None:
            drawn_here[k] = draw(todo[k])
            inbox.put(("drawn", k, drawn_here[k]))
            sent += 1
            drawn_here = {j: batch for j, batch in drawn_here.items() if j > k - MAX_AHEAD}
            while receive(block=False):
                pass
            # Memory: the sampler runs at most MAX_AHEAD batches ahead of the rows written.
            while sent - received / PARTS >= MAX_AHEAD:
                receive(block=True)
        # Nothing left to draw: rather than wait, prepare the last batches here (the worker then only
        # puts them through the duplicate index), from the end until meeting the worker.
        helper = _Finisher(*finisher_args)
        for unit in sorted((k * PARTS + part for k in drawn_here for part in range(PARTS)), reverse=True):
            if not claims.finish(unit, SAMPLER):
                break
            k, part = divmod(unit, PARTS)
            inbox.put(("prepared", unit, helper.prepare(_part(drawn_here[k], part), forms=True)))
            while receive(block=False):
                pass
        while received < len(todo) * PARTS:
            receive(block=True)
        proc.join()
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join()
        inbox.cancel_join_thread()  # what a failed worker never read must not hold up the exit


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).
    A batch's tensors change size at every step, and glibc keeps the freed space fragmented in its
    heap: without this, a sampling process grew from 540 to 736 MB over 24 batches, with it
    434 to 448 MB, at the same CPU time (2026-11-30)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def default_worker(processes: int = 1) -> bool:
    """A worker beside the sampler when each of `processes` such processes has two cores or more."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return cores >= 2 * processes
