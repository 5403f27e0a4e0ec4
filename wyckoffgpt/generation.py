"""CrystalGenerator: load a trained model and generate filtered crystal structures.

    gen = CrystalGenerator.from_pretrained("path/to/model")
    results = gen.generate(100, elements=["Al", "Ca", "Cu"], ehull="low")

Every sampled sequence is grammatical by construction (see grammar.py); each result still carries
its decoding and filter outcome in `flags`, so nothing is dropped without a trace.
"""
from __future__ import annotations

import functools
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Element, Structure

from .decode import DEFAULT_MIN_DISTANCE, DEFAULT_SYMPREC, check_structure
from .duplicates import find_duplicates
from .grammar import Conditions, DecodeError, Limits, SequenceParser, WyckoffDescription, check_conditions
from .metrics import CHARGE_CHECKS, description_composition, passes_charge_check, smact_valid
from .sampling import MAX_RETRIES, Sampler
from .tokenizer import CrystalSequence, CrystalTokenizer
from .vocab import STABILITY_TOKENS, Vocab, default_vocab

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
# Name of the bundled default model under PRETRAINED_DIR; None: the only model folder there.
BUNDLED_MODEL: str | None = None
DEFAULT_BATCH_SIZE = 256
# Longest prompt: <bos>, stability, n:k, up to 8 elements, sg; then per site orbit, element and up
# to 3 coordinates; then up to 6 lattice values and <eos>.
_FIXED_TOKENS = 3 + 8 + 1 + 6 + 1
_TOKENS_PER_SITE = 5


@contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (None: leave them)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class InputError(ValueError):
    """Bad user input or an unusable model; the one-line message says what and how to fix it."""


@dataclass
class GeneratedCrystal:
    """One sample: its sequence, the structure (None when it did not decode) and the filter results.

    flags: "decode_error" (structure None, see `error`), "too_close" (atoms nearer than the distance
    threshold), "spacegroup_mismatch" (spglib finds another group than the sequence's),
    "duplicate" (matches an earlier valid sample), "filter_error" (the checks failed numerically; the
    structure is then also marked "too_close" so it is not written), "not_charge_balanced" (the
    composition failed the generator's charge check and the retries did not mend it; not written).
    charge_balanced: the composition passes SMACT (`wyckoffgpt.metrics.smact_valid`), whatever
    charge check was in force; None when the sequence did not decode."""

    index: int
    sequence: CrystalSequence
    structure: Structure | None
    spacegroup: int | None  # the group the sequence states (the requested one when conditioned)
    detected_spacegroup: int | None
    min_distance: float | None
    temperature: float
    flags: list[str] = field(default_factory=list)
    error: str | None = None
    retries: int = 0  # how often the sampler sent this sequence back (clashes, failed charge check)
    charge_balanced: bool | None = None

    @property
    def distance_valid(self) -> bool:
        """Decoded, and no two atoms closer than the distance threshold."""
        return self.structure is not None and "too_close" not in self.flags

    @property
    def valid(self) -> bool:
        """Decoded and passed the filters asked for: the structures worth writing."""
        return self.distance_valid and "not_charge_balanced" not in self.flags


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def normalize_elements(elements: Sequence[str]) -> list[str]:
    """Element symbols checked against the periodic table (any capitalisation), duplicates dropped."""
    out: list[str] = []
    for raw in elements:
        sym = raw.strip()
        sym = sym[:1].upper() + sym[1:].lower()
        if not Element.is_valid_symbol(sym):
            raise InputError(f"unknown element symbol {raw!r}")
        if sym not in out:
            out.append(sym)
    if not out:
        raise InputError("--elements needs at least one element symbol")
    return out


def _load_vocab(folder: Path, vocab_hash: str) -> Vocab:
    """The model folder's own vocabulary files, else the packaged one if it is the same vocabulary."""
    candidates = []
    if (folder / "tokenizer.json").is_file() and (folder / "wyckoff_tables.json").is_file():
        try:
            candidates.append(Vocab(folder))
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"model folder {folder} has a corrupt vocabulary: {_first_line(e)}") from None
    candidates.append(default_vocab())
    for vocab in candidates:
        if vocab.hash == vocab_hash:
            return vocab
    raise InputError(f"model folder {folder}: its vocabulary (hash {vocab_hash}) is neither in the folder nor the "
                     f"packaged one ({candidates[-1].hash})")


def resolve_model_path(path_or_repo_id: str | Path | None) -> Path:
    if path_or_repo_id is None:
        found = sorted(p for p in PRETRAINED_DIR.glob("*/config.json")) if PRETRAINED_DIR.is_dir() else []
        if BUNDLED_MODEL is not None:
            found = [p for p in found if p.parent.name == BUNDLED_MODEL]
        if len(found) != 1:
            raise InputError("no bundled default model in this installation yet: pass a trained model folder "
                             "(as written by train.py --out DIR) or a Hub repo id, e.g. --model DIR")
        return found[0].parent
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"model path {path} is not a folder")
        return path
    text = str(path_or_repo_id)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not text.endswith((".json", ".safetensors")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text))
        except Exception as e:  # offline, unknown repo, no permission: all mean "cannot use this model"
            raise InputError(f"model {text!r} is neither a folder nor an available Hub repository "
                             f"({_first_line(e)})") from None
    raise InputError(f"model folder {path} does not exist")


class CrystalGenerator:
    """A model, its vocabulary and the sampling limits; `generate` returns filtered samples."""

    def __init__(self, model: torch.nn.Module, vocab: Vocab, limits: Limits | None = None,
                 device: str | torch.device | None = None, cpu_threads: int | None = None):
        """`cpu_threads`: torch intra-op threads while sampling on CPU. Default 1 unless
        OMP_NUM_THREADS is set: a sampling step is many small ops, and intra-op threads cost more in
        synchronisation than they gain (on a busy 2-core machine, 50 samples took 0.4 s with one
        thread and 16 s with two)."""
        if cpu_threads is None and "OMP_NUM_THREADS" not in os.environ:
            cpu_threads = 1
        self.cpu_threads = cpu_threads
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.tokenizer = CrystalTokenizer(vocab)
        limits = limits or Limits()
        config = model.config
        if getattr(config, "position_embedding", "sinusoidal") == "learned":
            # Learned positions end at max_position_embeddings: keep every sequence within them.
            fit = (config.max_position_embeddings - _FIXED_TOKENS) // _TOKENS_PER_SITE
            if fit < 1:
                raise InputError(f"max_position_embeddings={config.max_position_embeddings} is too short "
                                 f"for any crystal sequence")
            limits = Limits(min(limits.max_sites, fit), limits.max_atoms)
        self.limits = limits
        self.last_seed: int | None = None

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path | None = None, device: str | torch.device | None = None,
                        limits: Limits | None = None, cpu_threads: int | None = None) -> "CrystalGenerator":
        """Load a model folder (config.json, weights, tokenizer files) or Hub repo id; None: the
        bundled default model. Raises InputError for a missing or corrupt model."""
        from .modeling_wyckoffgpt import WyckoffGPTModel

        folder = resolve_model_path(path_or_repo_id)
        if not (folder / "config.json").is_file():
            raise InputError(f"model folder {folder} has no config.json (is it a model folder written by train.py?)")
        try:
            # float32 whatever the folder was saved in: sampling on the CPU has no fast half types, and
            # the value heads need the precision (coordinates to ~1e-4).
            model, info = WyckoffGPTModel.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32)
        except Exception as e:  # unreadable JSON, truncated weights, wrong model type, ...
            raise InputError(f"model folder {folder} is corrupt or incomplete: {_first_line(e)}") from None
        if info.get("missing_keys") or info.get("mismatched_keys"):
            missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
            raise InputError(f"model folder {folder} is corrupt or incomplete: weights for {missing[0]} "
                             f"missing or of the wrong shape")
        vocab = _load_vocab(folder, model.config.vocab_hash)
        if len(vocab) != model.config.vocab_size:
            raise InputError(f"model folder {folder}: vocabulary has {len(vocab)} tokens, model {model.config.vocab_size}")
        return cls(model, vocab, limits=limits, device=device, cpu_threads=cpu_threads)

    def conditions(self, elements: Sequence[str] | None = None, ehull: str | None = None,
                   spacegroup: int | None = None) -> Conditions:
        """Validated conditioning (InputError naming the problem when impossible)."""
        if ehull not in STABILITY_TOKENS or ehull == "unknown":
            raise InputError(f"ehull must be 'low', 'high' or None, got {ehull!r}")
        els = None
        if elements is not None:
            els = normalize_elements(elements)
            missing = [e for e in els if e not in self.vocab.element_ids]
            if missing:
                raise InputError(f"element {missing[0]} is not in the model's vocabulary")
            els = tuple(sorted(els, key=lambda e: self.vocab.element_z[self.vocab.element_ids[e]]))
        if spacegroup is not None and (isinstance(spacegroup, bool) or not 1 <= int(spacegroup) <= 230
                                       or int(spacegroup) != spacegroup):
            raise InputError(f"space group must be an integer in 1-230, got {spacegroup}")
        cond = Conditions(STABILITY_TOKENS[ehull] if ehull else None, els,
                          int(spacegroup) if spacegroup is not None else None)
        try:
            check_conditions(self.vocab, cond, self.limits)
        except ValueError as e:
            raise InputError(str(e)) from None
        return cond

    def iter_batches(self, n: int, elements: Sequence[str] | None = None, ehull: str | None = None,
                     spacegroup: int | None = None, temperature: float = 1.0, seed: int | None = None,
                     batch_size: int = DEFAULT_BATCH_SIZE, top_p: float | None = None,
                     min_distance: float = DEFAULT_MIN_DISTANCE, on_finished: Callable[[int], None] | None = None,
                     max_retries: int = MAX_RETRIES, charge_check: str = "ionic",
                     batches: Iterable[int] | None = None) -> Iterator[list[tuple[int, CrystalSequence, int]]]:
        """The sampled sequences before decoding, one list of (index, sequence, retries) per batch.

        Batch b holds indices b * batch_size onwards and draws from its own random stream
        (`batch_seed(seed, b)`), so any subset of the batches (`batches`: a resumed run, one
        process's share) gives exactly the samples a whole run gives at those indices."""
        if isinstance(n, bool) or int(n) != n or n <= 0:
            raise InputError(f"number of samples must be a positive integer, got {n}")
        if not temperature > 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
            raise InputError(f"batch size must be a positive integer, got {batch_size}")
        if top_p is not None and not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(max_retries, bool) or int(max_retries) != max_retries or max_retries < 0:
            raise InputError(f"max_retries must be a non-negative integer, got {max_retries}")
        if charge_check not in CHARGE_CHECKS:
            raise InputError(f"charge check must be one of {', '.join(CHARGE_CHECKS)}, got {charge_check!r}")
        cond = self.conditions(elements, ehull, spacegroup)
        self.last_seed = seed = secrets.randbits(63) if seed is None else int(seed)
        sampler = Sampler(self.model, temperature=temperature, top_p=top_p, min_distance=min_distance,
                          max_retries=int(max_retries),
                          accept_sites=None if charge_check == "off" else functools.partial(_passes, charge_check))
        for b in range(math.ceil(n / batch_size)) if batches is None else batches:
            start = b * batch_size
            size = min(batch_size, n - start)
            generator = torch.Generator(device=self.device).manual_seed(batch_seed(seed, b))
            parsers = [SequenceParser(self.vocab, self.limits, cond) for _ in range(size)]
            with _cpu_threads(self.cpu_threads if self.device.type == "cpu" else None):
                batch = sampler.sample(parsers, generator=generator, on_step=on_finished)
            yield [(start + i, CrystalSequence.from_ids(ids, values, self.vocab), retries)
                   for i, (ids, values, retries) in enumerate(zip(batch.ids, batch.values, batch.retries))]

    def iter_generate(self, n: int, elements: Sequence[str] | None = None, ehull: str | None = None,
                      spacegroup: int | None = None, temperature: float = 1.0, seed: int | None = None,
                      batch_size: int = DEFAULT_BATCH_SIZE, top_p: float | None = None,
                      min_distance: float = DEFAULT_MIN_DISTANCE, symprec: float = DEFAULT_SYMPREC,
                      on_finished: Callable[[int], None] | None = None,
                      max_retries: int = MAX_RETRIES, charge_check: str = "ionic",
                      batches: Iterable[int] | None = None) -> Iterator[GeneratedCrystal]:
        """Like `generate`, one result at a time as batches finish, without duplicate marking
        (`batches`: see `iter_batches`)."""
        for batch in self.iter_batches(n, elements, ehull, spacegroup, temperature, seed, batch_size, top_p,
                                       min_distance, on_finished, max_retries, charge_check, batches):
            for index, seq, retries in batch:
                yield finish_sample(self.tokenizer, index, seq, retries, temperature, min_distance, symprec,
                                    charge_check)

    def generate(self, n: int, elements: Sequence[str] | None = None, ehull: str | None = None,
                 spacegroup: int | None = None, temperature: float = 1.0, seed: int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, top_p: float | None = None,
                 min_distance: float = DEFAULT_MIN_DISTANCE, symprec: float = DEFAULT_SYMPREC,
                 check_unique: bool = True, on_finished: Callable[[int], None] | None = None,
                 max_retries: int = MAX_RETRIES, charge_check: str = "ionic") -> list[GeneratedCrystal]:
        """Sample n crystals. `elements`: exactly this chemical system (each element used);
        `ehull`: "low" | "high" | None (sampled); `spacegroup`: 1-230 or None (sampled).
        `max_retries`: how often a sequence whose atoms clash (closer than `min_distance`) is sent
        back to the site where the clash begins and sampled again from there (0: raw model samples).
        `charge_check` ("ionic" | "smact" | "off", see `wyckoffgpt.metrics.CHARGE_CHECKS`): a sequence
        whose composition fails it is drawn again after the given conditions, within the same retries;
        what still fails is flagged "not_charge_balanced" and not valid. The default, "ionic", asks
        oxides, nitrides, chalcogenides and halides for a charge-neutral set of oxidation states and
        leaves intermetallics, borides, carbides and silicides as drawn; "smact" asks every composition
        to pass SMACT; "off" keeps the model's compositions as drawn.
        The same seed and batch size give the same crystals on the same device and library versions."""
        results = list(self.iter_generate(n, elements, ehull, spacegroup, temperature, seed, batch_size, top_p,
                                          min_distance, symprec, on_finished, max_retries, charge_check))
        if check_unique:
            mark_duplicates(results)
        return results


def batch_seed(seed: int, batch: int) -> int:
    """Seed of batch `batch`'s random stream in a run seeded `seed` (independent streams per batch)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, batch]).generate_state(1, np.uint64)[0] >> 1)


def finish_sample(tokenizer: CrystalTokenizer, index: int, seq: CrystalSequence, retries: int, temperature: float,
                  min_distance: float = DEFAULT_MIN_DISTANCE, symprec: float = DEFAULT_SYMPREC,
                  charge_check: str = "ionic") -> GeneratedCrystal:
    """A sampled sequence decoded and put through the filters (needs no model: runs in any process)."""
    result = _result(tokenizer, index, seq, temperature, min_distance, symprec)
    result.retries = retries
    if result.structure is not None and not passes_charge_check(result.structure.composition, charge_check):
        result.flags.append("not_charge_balanced")
    return result


def _result(tokenizer: CrystalTokenizer, index: int, seq: CrystalSequence, temperature: float, min_distance: float,
            symprec: float) -> GeneratedCrystal:
    sg = next((int(t[3:]) for t in seq.tokens if t.startswith("sg:")), None)
    try:
        structure = tokenizer.decode(seq)
    except DecodeError as e:  # not expected (the grammar prevents it), but recorded, never hidden
        return GeneratedCrystal(index, seq, None, sg, None, None, temperature, ["decode_error"], str(e))
    try:
        check = check_structure(structure, sg, min_distance, symprec)
    except (ValueError, ArithmeticError) as e:  # numerical failure on a degenerate cell: not written
        return GeneratedCrystal(index, seq, structure, sg, None, None, temperature, ["too_close", "filter_error"],
                                f"distance/symmetry check failed: {_first_line(e)}",
                                charge_balanced=smact_valid(structure.composition))
    return GeneratedCrystal(index, seq, structure, sg, check.detected_spacegroup, check.min_distance,
                            temperature, check.flags, charge_balanced=smact_valid(structure.composition))


def _passes(charge_check: str, desc: WyckoffDescription) -> bool:
    return passes_charge_check(description_composition(desc), charge_check)


def mark_duplicates(results: list[GeneratedCrystal]) -> None:
    """Flag valid results that match an earlier valid one as "duplicate" (canonical forms compared
    with StructureMatcher's tolerances, see wyckoffgpt.duplicates)."""
    valid = [r for r in results if r.valid]
    for r, match in zip(valid, find_duplicates([r.structure for r in valid])):
        if match is not None:
            r.flags.append("duplicate")
