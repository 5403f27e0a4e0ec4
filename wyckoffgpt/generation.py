"""CrystalGenerator: load a trained model and generate filtered crystal structures.

    gen = CrystalGenerator.from_pretrained("path/to/model")
    results = gen.generate(100, elements=["Al", "Ca", "Cu"], ehull="low")

Every sampled sequence is grammatical by construction (see grammar.py); each result still carries
its decoding and filter outcome in `flags`, so nothing is dropped without a trace.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pymatgen.core import Element, Structure

from .analogues import Analogue, analogue_conditions, analogue_slot, first_round, known_skeletons, substitute
from .chemistry import passes_charge_check, smact_valid
from .conditioning import ConditioningError, check_prompt, parse_formula, parse_prompt, parse_wyckoff
from .decode import check_structure
from .duplicates import find_duplicates
from .grammar import Conditions, DecodeError, Limits, SequenceParser, check_conditions
from .model_folder import BUNDLED_INIT, TRAINING_SUMMARY
from .sampling import FIELD_NAMES, Sampler, SamplingConfig, check_num_samples, contrast_token_map
from .structure_io import InputError
from .tokenizer import CrystalSequence, CrystalTokenizer
from .vocab import STABILITY_TOKENS, Vocab, default_vocab

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
# Name of the bundled default model under PRETRAINED_DIR; None: the only model folder there. Other
# folders there are alternatives a user names (`--model NAME`).
BUNDLED_MODEL: str | None = "wyckoffgpt-mp-small-system"
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




class Sample(NamedTuple):
    """A sequence as `CrystalGenerator.iter_batches` yields it, before decoding."""

    index: int  # its place in the run
    sequence: CrystalSequence
    retries: int  # how often the sampler sent it back
    template_id: str | None = None  # the material id of the training crystal it copies (analogue_templates)


@dataclass
class GeneratedCrystal:
    """One sample: its sequence, the structure (None when it did not decode) and the filter results.

    flags: "decode_error" (structure None, see `error`), "too_close" (atoms nearer than the distance
    threshold), "spacegroup_mismatch" (spglib finds another group than the sequence's),
    "duplicate" (matches an earlier valid sample), "filter_error" (the checks failed numerically; the
    structure is then also marked "too_close" so it is not written), "not_charge_balanced" (the
    composition failed the generator's charge check and the retries did not mend it; not written),
    "template" (not drawn: a known crystal of a neighbouring system with the requested elements put
    back, `SamplingConfig.analogue_templates`; written like any other).
    charge_balanced: the composition passes SMACT (`wyckoffgpt.chemistry.smact_valid`), whatever
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
    # spglib's dataset from the filter (at the config's symprec), for the duplicate index (the writer drops it)
    symmetry: Any = field(default=None, repr=False, compare=False)

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
    """Element symbols checked against the periodic table (any capitalisation). An element given
    twice is an error, not silently merged: `Al Al` is more likely a typo for another element."""
    if isinstance(elements, str):
        raise InputError(f"elements must be a list of symbols, e.g. ['Al', 'Ca'], got the string {elements!r}")
    out: list[str] = []
    for raw in elements:
        sym = str(raw).strip()
        sym = sym[:1].upper() + sym[1:].lower()
        if not Element.is_valid_symbol(sym):
            raise InputError(f"unknown element symbol {raw!r}")
        if sym in out:
            raise InputError(f"element {sym} is given twice")
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


def bundled_folder(name: str) -> Path | None:
    """The folder of the model bundled with the package under this name; None if there is none."""
    folder = PRETRAINED_DIR / name
    return folder if "/" not in name and (folder / "config.json").is_file() else None


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
    if (bundled := bundled_folder(text)) is not None:
        return bundled
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
                 device: str | torch.device | None = None, cpu_threads: int | None = None,
                 sampling_defaults: SamplingConfig | None = None, learned_unknown: bool | None = None,
                 model_folder: Path | None = None):
        """`sampling_defaults`: the settings used when a call passes no `config` (default:
        `SamplingConfig()`; `from_pretrained` reads the model folder's recommendation).
        `learned_unknown`: whether the model learnt `ehull:unknown` (trained with stability_dropout),
        None when not known; guidance against that token is refused when False (`from_pretrained`
        reads it from the folder, see `learned_unknown`). `model_folder`: where the model's training
        crystals (`fingerprints.npz`) are, for `analogue_source="known"` (`from_pretrained` sets it).
        `cpu_threads`: torch intra-op threads while sampling on CPU. Default 1 unless
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
        self.sampling_defaults = SamplingConfig.resolve(sampling_defaults)
        self.learned_unknown = learned_unknown
        self.model_folder = model_folder
        self._training_index = None
        self.last_seed: int | None = None

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path | None = None, device: str | torch.device | None = None,
                        limits: Limits | None = None, cpu_threads: int | None = None) -> CrystalGenerator:
        """Load a model folder (config.json, weights, tokenizer files) or Hub repo id; None: the
        bundled default model. Raises InputError for a missing or corrupt model. The folder's
        `sampling_config.json`, if any, becomes `sampling_defaults` (`SamplingConfig.from_pretrained`)."""
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
        return cls(model, vocab, limits=limits, device=device, cpu_threads=cpu_threads,
                   sampling_defaults=SamplingConfig.from_pretrained(folder), learned_unknown=learned_unknown(folder),
                   model_folder=folder)

    def sampling_config(self, config: SamplingConfig | None = None, **overrides: Any) -> SamplingConfig:
        """`config` (default: `sampling_defaults`, the model's recommendation) with keyword overrides
        of its fields: the settings a call samples with."""
        return SamplingConfig.resolve(self.sampling_defaults if config is None else config, **overrides)

    def conditions(self, elements: Sequence[str] | None = None, ehull: str | None = None,
                   spacegroup: int | None = None, *, formula: str | None = None,
                   formula_units: Sequence[int] | None = None, wyckoff: str | None = None,
                   complete_sites: bool = False) -> Conditions:
        """Validated conditioning (InputError naming the problem when impossible). `formula`, e.g.
        "Ca2AlCu2": exactly this reduced formula, `formula_units` (e.g. (1, 2, 4)) formula units per
        cell (default: any that fit the atom limit); `wyckoff`, e.g. "225: Na 4a, Cl 4b": this space
        group and exactly these sites (more sites too with `complete_sites`), the model drawing the
        free coordinates and the cell."""
        try:
            extra = self._exact_conditions(elements, spacegroup, formula, formula_units, wyckoff, complete_sites)
        except ConditioningError as e:
            raise InputError(str(e)) from None
        if extra:
            elements, spacegroup = None, extra.pop("spacegroup", spacegroup)
        if ehull not in STABILITY_TOKENS or ehull == "unknown":
            raise InputError(f"ehull must be 'low', 'high' or None, got {ehull!r}")
        els = None
        if elements is not None:
            els = normalize_elements(elements)
            missing = [e for e in els if e not in self.vocab.element_ids]
            if missing:
                raise InputError(f"element {missing[0]} is not in the model's vocabulary")
            els = tuple(self.vocab.by_z(els))
        if spacegroup is not None and (isinstance(spacegroup, bool) or not 1 <= int(spacegroup) <= 230
                                       or int(spacegroup) != spacegroup):
            raise InputError(f"space group must be an integer in 1-230, got {spacegroup}")
        if extra:
            els = extra.pop("elements")
        cond = Conditions(STABILITY_TOKENS[ehull] if ehull else None, els,
                          int(spacegroup) if spacegroup is not None else None, **extra)
        try:
            check_conditions(self.vocab, cond, self.limits)
        except ValueError as e:
            raise InputError(str(e)) from None
        return cond

    def _exact_conditions(self, elements: Sequence[str] | None, spacegroup: int | None, formula: str | None,
                          formula_units: Sequence[int] | None, wyckoff: str | None,
                          complete_sites: bool) -> dict:
        """Conditions fields for a formula or Wyckoff spec (elements in increasing Z); {} for neither."""
        if formula_units is not None and formula is None:
            raise ConditioningError("formula units need a formula")
        if complete_sites and wyckoff is None:
            raise ConditioningError("complete_sites needs Wyckoff sites")
        if formula is not None and wyckoff is not None:
            raise ConditioningError("give either a formula or Wyckoff sites, not both")
        if formula is not None:
            els, counts = parse_formula(formula, self.vocab)
            units = None
            if formula_units is not None:
                given = list(formula_units)
                if not given or any(isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or k < 1
                                    for k in given):
                    raise ConditioningError(f"formula units must be positive integers, got {given}")
                units = tuple(sorted({int(k) for k in given}))
            extra = {"elements": els, "formula": counts, "formula_units": units}
        elif wyckoff is not None:
            number, sites = parse_wyckoff(wyckoff, self.vocab)
            if spacegroup is not None and int(spacegroup) != number:
                raise ConditioningError(f"space group {spacegroup} contradicts the Wyckoff spec's {number}")
            els = tuple(self.vocab.by_z({e for _, e in sites}))
            extra = {"elements": els, "spacegroup": number, "sites": sites, "complete_sites": bool(complete_sites)}
        else:
            return {}
        if elements is not None and set(normalize_elements(elements)) != set(extra["elements"]):
            raise ConditioningError(f"elements {' '.join(elements)} contradict the elements of the "
                                    f"{'formula' if formula is not None else 'Wyckoff spec'}")
        return extra

    def prompt_prefix(self, prompt: str | None, cond: Conditions) -> tuple[list[int], list[float]] | None:
        """Token ids and values of a sequence prefix that every sample continues (InputError when the
        grammar, the conditions or the limits reject it, naming the first bad token)."""
        if prompt is None:
            return None
        try:
            seq = parse_prompt(prompt, self.vocab)
            check_prompt(seq, SequenceParser(self.vocab, self.limits, cond))
        except ConditioningError as e:
            raise InputError(str(e)) from None
        return seq.ids.tolist(), seq.values.tolist()

    def iter_batches(self, n: int, elements: Sequence[str] | None = None, ehull: str | None = None,
                     spacegroup: int | None = None, *, formula: str | None = None,
                     formula_units: Sequence[int] | None = None, wyckoff: str | None = None,
                     complete_sites: bool = False, prompt: str | None = None, config: SamplingConfig | None = None,
                     batches: Iterable[int] | None = None, on_finished: Callable[[int], None] | None = None,
                     **overrides: Any) -> Iterator[list[Sample]]:
        """The sampled sequences before decoding, one list of `Sample`s (index, sequence, retries,
        template_id) per batch (the conditions, `config` and keyword overrides of its fields: see `generate`).

        Batch b holds indices b * batch_size onwards and draws from its own random stream
        (`batch_seed(seed, b)`), so any subset of the batches (`batches`: a resumed run, one
        process's share) gives exactly the samples a whole run gives at those indices. The
        arguments are checked here, at the call (InputError), not when the first batch is drawn."""
        check_num_samples(n)
        config = self.sampling_config(config, **overrides)
        cond = self.conditions(elements=elements, ehull=ehull, spacegroup=spacegroup, formula=formula,
                               formula_units=formula_units, wyckoff=wyckoff, complete_sites=complete_sites)
        prefix = self.prompt_prefix(prompt, cond)
        config = self.guided_config(cond, prefix, config)
        analogues = self.analogues(cond, config, prompt)
        self.last_seed = seed = secrets.randbits(63) if config.seed is None else int(config.seed)
        config = config.replace(seed=seed)
        todo = range(math.ceil(n / config.batch_size)) if batches is None else batches
        return self._batches(Sampler(self.model, config), cond, analogues, prefix, n, todo, on_finished)

    def guided_config(self, cond: Conditions, prefix: tuple[list[int], list[float]] | None,
                      config: SamplingConfig) -> SamplingConfig:
        """`config` with guidance off where the request fixes no class for it to act on; InputError
        where it cannot work (against `ehull:unknown` with a model that never learnt that token)."""
        if config.guided and not self._asks_guided_class(cond, prefix, config):
            return config.replace(guidance=1.0)  # guidance sharpens a class asked for, not a drawn one
        if config.guided and config.guidance_contrast != "opposite" and self.learned_unknown is False:
            raise InputError("guidance against ehull:unknown needs a model trained with stability_dropout; this "
                             "one never saw that token (use --guidance-contrast opposite, or such a model)")
        return config

    def _asks_guided_class(self, cond: Conditions, prefix: tuple[list[int], list[float]] | None,
                           config: SamplingConfig) -> bool:
        """Whether the request fixes a stability class that guidance acts on (ehull, or one in the prompt)."""
        guided = contrast_token_map(self.vocab, config.guidance_contrast)
        return cond.stability is not None or (prefix is not None and not guided.keys().isdisjoint(prefix[0]))

    def analogues(self, cond: Conditions, config: SamplingConfig, prompt: str | None = None) -> list[Analogue]:
        """The analogue systems a request draws `config.analogue_share` of its samples in (see
        `SamplingConfig.analogues`); [] when off. InputError when the request has no chemical system
        to take analogues of, or fixes sites or a prefix that name its elements."""
        if config.analogues == 0 or config.analogue_share == 0:
            return []
        if not cond.elements or cond.sites is not None or prompt is not None:
            raise InputError("analogues need a chemical system or a formula, and no Wyckoff sites or prompt")
        if config.analogue_source == "known":
            if cond.formula is not None:
                raise InputError("known analogues need a chemical system (--elements), not a formula")
            # A system whose neighbours the model never saw has no known skeleton: [] samples it plainly.
            if config.analogue_substitutions > len(cond.elements):
                raise InputError(f"{config.analogue_substitutions} analogue substitutions in a system of "
                                 f"{len(cond.elements)} elements")
            return known_skeletons(cond, config.analogues, self.training_index(), self.limits,
                                   config.analogue_substitutions, templates=config.analogue_templates)
        found = analogue_conditions(cond, config.analogues, self.vocab)
        try:
            for a in found:
                check_conditions(self.vocab, a.conditions, self.limits)
        except ValueError as e:
            raise InputError(f"analogue system {a.system}: {e}") from None
        return found

    def training_index(self):
        """The model's training crystals (`fingerprints.npz` of its folder), loaded on first use;
        InputError when the model has none."""
        if self._training_index is None:
            from .fingerprints import FingerprintIndex

            if self.model_folder is None:
                raise InputError("known analogues need the model's training crystals: give the generator its "
                                 "model_folder (from_pretrained does)")
            try:
                self._training_index = FingerprintIndex.load(self.model_folder, self.vocab)
            except (FileNotFoundError, ValueError) as e:
                raise InputError(f"known analogues need the model's training crystals: {_first_line(e)}") from None
        return self._training_index

    def _batches(self, sampler: Sampler, cond: Conditions, analogues: list[Analogue],
                 prefix: tuple[list[int], list[float]] | None, n: int, batches: Iterable[int],
                 on_finished: Callable[[int], None] | None) -> Iterator[list[Sample]]:
        batch_size, seed = sampler.config.batch_size, sampler.config.seed
        share, repeats = sampler.config.analogue_share, sampler.config.analogue_repeats
        templates = sampler.config.analogue_templates
        for b in batches:
            start = b * batch_size
            size = min(batch_size, n - start)
            generator = torch.Generator(device=self.device).manual_seed(batch_seed(seed, b))
            drawn = [None if (j := analogue_slot(start + i, share, len(analogues), repeats)) is None else analogues[j]
                     for i in range(size)]
            parsers = [SequenceParser(self.vocab, self.limits, cond if a is None else a.conditions) for a in drawn]
            with _cpu_threads(self.cpu_threads if self.device.type == "cpu" else None):
                batch = sampler.sample(parsers, generator=generator, on_step=on_finished, prefix=prefix)
            out = []
            for i, (ids, values, retries) in enumerate(zip(batch.ids, batch.values, batch.retries)):
                a = drawn[i]
                if templates and a is not None and a.template is not None and first_round(start + i, share, len(analogues)):
                    # Drawn all the same, so that every other sample of the run is what it is without templates.
                    out.append(Sample(start + i, a.template, 0, a.template_id))
                    continue
                seq = CrystalSequence.from_ids(ids, values, self.vocab)
                if a is not None and a.by is not None:
                    seq = substitute(self.tokenizer, seq, a)
                out.append(Sample(start + i, seq, retries))
            yield out

    def iter_generate(self, n: int, elements: Sequence[str] | None = None, ehull: str | None = None,
                      spacegroup: int | None = None, *, config: SamplingConfig | None = None,
                      batches: Iterable[int] | None = None, on_finished: Callable[[int], None] | None = None,
                      **kwargs: Any) -> Iterator[GeneratedCrystal]:
        """Like `generate`, one result at a time as batches finish, without duplicate marking.
        `kwargs`: the exact conditions (`formula`, `formula_units`, `wyckoff`, `complete_sites`,
        `prompt`) and overrides of `config`'s fields; `batches`: see `iter_batches`. Checked at the
        call, like `iter_batches`."""
        overrides = {k: kwargs.pop(k) for k in FIELD_NAMES if k in kwargs}
        config = self.sampling_config(config, **overrides)
        sequences = self.iter_batches(n, elements=elements, ehull=ehull, spacegroup=spacegroup, config=config,
                                      batches=batches, on_finished=on_finished, **kwargs)
        return (finish_sample(self.tokenizer, sample, config) for batch in sequences for sample in batch)

    def generate(self, n: int, elements: Sequence[str] | None = None, ehull: str | None = None,
                 spacegroup: int | None = None, *, formula: str | None = None,
                 formula_units: Sequence[int] | None = None, wyckoff: str | None = None,
                 complete_sites: bool = False, prompt: str | None = None, config: SamplingConfig | None = None,
                 check_unique: bool = True, on_finished: Callable[[int], None] | None = None,
                 **overrides: Any) -> list[GeneratedCrystal]:
        """Sample n crystals.

        What to generate: `elements`: exactly this chemical system (each element used); `ehull`:
        "low" | "high" | None (sampled); `spacegroup`: 1-230 or None (sampled); `formula`
        ("Ca2AlCu2"), `formula_units` ((1, 2, 4)), `wyckoff` ("225: Na 4a, Cl 4b"),
        `complete_sites`: see `conditions`. `prompt`: a sequence prefix in CrystalSequence text form
        ("<bos> ehull:low n:2 Na Cl sg:225 ..."), continued by every sample and kept verbatim.

        How: `config`, a `wyckoffgpt.sampling.SamplingConfig` (temperature, top_p, batch_size,
        seed, min_distance, max_retries, charge_check, symprec: each documented there), and
        keyword overrides of its fields: `generate(100, temperature=0.8, seed=0)`.
        `check_unique`: flag valid samples that repeat an earlier one "duplicate" (see
        `mark_duplicates`); `on_finished(k)`: called as k more samples are finished.
        The same seed and batch size give the same crystals on the same device and library versions."""
        results = list(self.iter_generate(n, elements=elements, ehull=ehull, spacegroup=spacegroup, config=config,
                                          on_finished=on_finished, formula=formula, formula_units=formula_units,
                                          wyckoff=wyckoff, complete_sites=complete_sites, prompt=prompt, **overrides))
        if check_unique:
            mark_duplicates(results)
        return results


def learned_unknown(folder: Path, _depth: int = 0) -> bool | None:
    """Whether the model in `folder` was trained to read `ehull:unknown`: its training_summary.json
    records stability_dropout > 0, or it was fine-tuned without it from a model that was (followed
    through the bundled models and local folders). False for a model trained from scratch without it,
    or fine-tuned from one; None when the folder does not say (no summary, or a base model on the Hub
    or no longer where it was)."""
    try:
        cfg = json.loads((folder / TRAINING_SUMMARY).read_text()).get("train_config", {})
    except (OSError, ValueError, AttributeError):
        return None
    if (cfg.get("stability_dropout") or 0) > 0:
        return True
    base = cfg.get("init_from")
    if base is None:
        return False
    if _depth >= 16:  # a chain this long is a loop of folders
        return None
    if base == BUNDLED_INIT:
        try:
            return learned_unknown(resolve_model_path(None), _depth + 1)
        except InputError:
            return None
    base_folder = Path(base).expanduser()
    if not base_folder.is_dir():
        base_folder = bundled_folder(base)  # a bundled model named as `--init-from NAME`, or None
    return learned_unknown(base_folder, _depth + 1) if base_folder is not None else None


def batch_seed(seed: int, batch: int) -> int:
    """Seed of batch `batch`'s random stream in a run seeded `seed` (independent streams per batch)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, batch]).generate_state(1, np.uint64)[0]) >> 1


def finish_sample(tokenizer: CrystalTokenizer, sample: Sample, config: SamplingConfig) -> GeneratedCrystal:
    """A sampled sequence decoded and put through the filters of `config` (its min_distance, symprec
    and charge_check; needs no model: runs in any process)."""
    result = _result(tokenizer, sample.index, sample.sequence, config.temperature, config.min_distance, config.symprec)
    result.retries = sample.retries
    if sample.template_id is not None:
        result.flags.append("template")
    if result.structure is not None and not passes_charge_check(result.structure.composition, config.charge_check):
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
                            temperature, check.flags, charge_balanced=smact_valid(structure.composition),
                            symmetry=check.symmetry)


def mark_duplicates(results: list[GeneratedCrystal]) -> None:
    """Flag valid results that match an earlier valid one as "duplicate" (canonical forms compared
    with StructureMatcher's tolerances, see wyckoffgpt.duplicates)."""
    valid = [r for r in results if r.valid]
    for r, match in zip(valid, find_duplicates([r.structure for r in valid])):
        if match is not None:
            r.flags.append("duplicate")
