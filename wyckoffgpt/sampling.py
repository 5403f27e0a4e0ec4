"""Batched autoregressive sampling with the model's KV cache, under the sequence grammar.

One step: mask the logits with each row's `SequenceParser.allowed_mask()` (so no row can reach a
dead end), divide by the temperature, optionally cut to the top-p nucleus, draw the token, then draw
its value from the value head (`model.sample_values`, which applies the same temperature to the
mixture) and feed only the new token through the model, reusing the cache. The settings named
below (temperature, top_p, min_distance, max_retries, charge_check) are fields of `SamplingConfig`.

Cell angles: the value head is free to propose angles that cannot close a triclinic cell. A value
outside the parser's `value_bounds` is redrawn up to `VALUE_REDRAWS` times and then clamped into
the bounds, so every finished sequence describes a cell with a clearly positive volume.

Atom clashes: with `min_distance` set, the last lattice length of a cell where that length can only
move atoms apart (cubic a; c of tetragonal, trigonal, hexagonal and orthorhombic cells) is drawn
from the model's distribution restricted to values that keep all atoms at least `min_distance`
apart: redrawn up to `GEOMETRY_REDRAWS` times. When the model puts (almost) no weight there, the
first value is kept and the structure fails the distance filter: it is not pushed to the edge
(atoms exactly `min_distance` apart would pass the filter and still be nonsense).

Clashes that no cell length can undo (two sites on nearly the same point, most often late in long
sequences) are resampled: a finished row whose crystal still has atoms closer than `min_distance`
goes back to the first token of the earliest site that completes a clash (`resume_point`) and is
sampled again from there, site, later sites and lattice, up to `max_retries` times; then the last
attempt is kept and the distance filter flags it. This is backtracking, not a filter after the
fact: the prefix the model chose stays, each retry is a fresh draw from the model given that
prefix, and `SampledBatch.retries` records how often each row went back (`max_retries=0` gives the
model's raw samples). Resampled rows run in a later round, left-padded to a common length.

With a charge check (`charge_check` other than "off": the sampler's `accept_sites`), a finished row
whose composition fails it is drawn again from the end of the prompt (the forced conditions), within
the same retry budget: rejection sampling of the model's distribution restricted to accepted crystals.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .chemistry import CHARGE_CHECKS, passes_charge_check
from .composition import feature_size, parser_features, sequence_features
from .decode import (
    DEFAULT_MIN_DISTANCE,
    DEFAULT_SYMPREC,
    SEPARABLE,
    close_pairs,
    description_cell,
    separating_length,
    shortest_lattice_vector,
)
from .descriptions import description_composition
from .grammar import DecodeError, SequenceParser, WyckoffDescription
from .structure_io import InputError
from .vocab import STABILITY_TOKENS, Vocab

VALUE_REDRAWS = 4
GUIDANCE_CONTRASTS = ("opposite", "unknown", "unknown-for-low")
ANALOGUE_SOURCES = ("sampled", "known")
GEOMETRY_REDRAWS = 8


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return _is_number(value) and math.isfinite(value) and int(value) == value


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: every setting of `Sampler`, `CrystalGenerator.generate` / `iter_generate` /
    `iter_batches`, `writer.RunSettings`, `sweep.run_sweep` and generate.py, in one validated object
    (like transformers' `GenerationConfig`). A value out of range raises `InputError` naming it when
    the object is made, so a bad setting fails at the call, before any model work.

        config = SamplingConfig(temperature=0.8, seed=0)
        gen.generate(100, elements=["Al", "Ca", "Cu"], config=config)
        gen.generate(100, temperature=0.8, seed=0)  # the same: keywords override `config`'s fields

    What to generate (elements, ehull, space group, formula, Wyckoff sites, prompt) and how many are
    not here: they are the request, checked against the model's vocabulary by
    `CrystalGenerator.conditions`, and the same settings serve any request. Frozen: derive a changed
    copy with `config.replace(temperature=1.3)` (validated again).

    A model folder may recommend settings (`sampling_config.json`, see `from_pretrained`): a
    `CrystalGenerator` starts from them (`CrystalGenerator.sampling_defaults`) when no `config` is
    given, and the defaults below hold for what the file leaves out.

    temperature: divides the token logits and scales the value head's mixture (see
        `model.sample_values`) before each draw; > 0, finite, dimensionless. Default 1.0, the
        model's own distribution; lower is more conservative, higher more diverse.
    top_p: nucleus sampling of tokens, keeping the smallest set of most likely tokens whose
        probability reaches top_p; in (0, 1]. Default None: off (every allowed token).
    batch_size: sequences drawn together in one batch; a positive integer. Default 256. Batch b
        draws from its own random stream, so the samples depend on it: same seed and batch size,
        same crystals.
    seed: seeds the random streams of the batches (`generation.batch_seed`); an integer in
        [0, 2**63). Default None: a random seed, recorded as `CrystalGenerator.last_seed`.
    min_distance: Å, >= 0. Default 0.7. Atoms closer than this mark a structure as not valid
        ("too_close"); while sampling, the last free cell length is drawn to keep atoms at least
        this far apart where it can, and a finished crystal that still clashes is sent back to the
        site where the clash begins (`max_retries`). 0: no distance filter or clash handling.
    max_retries: how often a sequence is sent back and sampled again, for a clash or a failed
        charge check (see the module docstring); a non-negative integer. Default 4; 0: the
        model's raw samples.
    charge_check: "ionic" | "smact" | "off" (`wyckoffgpt.chemistry.CHARGE_CHECKS`). A sequence
        whose composition fails it is drawn again after the given conditions, within
        `max_retries`; what still fails is flagged "not_charge_balanced" and is not valid. Default
        "ionic": oxides, nitrides, chalcogenides and halides need a charge-neutral set of oxidation
        states, intermetallics, borides, carbides and silicides are left as drawn; "smact": every
        composition must pass SMACT; "off": compositions as drawn.
    symprec: Å, > 0. Default 0.01 (the tolerance the tokenizer encodes with). spglib's tolerance
        when the filter compares a structure's space group with the one its sequence states
        ("spacegroup_mismatch"); does not change what is sampled.
    guidance: weight w of classifier-free guidance on the stability token, >= 0, dimensionless.
        Each token is drawn from `contrast + w * (conditioned - contrast)` of the two sequences'
        logits, where the contrast sequence is the same one with another stability token (see
        `guidance_contrast`); values are drawn from the conditioned sequence's value head. Default
        1.0: off (the conditioned logits, one forward pass); > 1 pushes samples further toward the
        class of their stability token, at twice the model cost. `CrystalGenerator` applies it only
        to a class the request fixes (ehull, or low/high in a prompt), so that unconditional
        samples stay the model's own distribution; `Sampler` to whatever class a row holds.
    guidance_contrast: "opposite" | "unknown" | "unknown-for-low". The stability token of the
        contrast sequence: "opposite" (default) the other class (ehull:high for low and back), which
        any model knows; "unknown": ehull:unknown, the unconditional model of a model trained with
        `stability_dropout` > 0 (textbook classifier-free guidance); "unknown-for-low": ehull:unknown
        for a low sequence and ehull:low for a high one, so `low` is drawn as with "unknown" while
        `high` is pushed away from what the model draws as stable (against ehull:high, `low` drifts to
        large cells; against unknown, `high` stays near the hull: BENCHMARKS.md, stability
        conditioning). `contrast_of` gives a class's contrast.
    analogues: k >= 0, an integer. With a chemical system (or formula) requested, a share of the
        samples (`analogue_share`) is drawn in the systems made by replacing one of its elements
        with one of that element's k nearest in Mendeleev number, and the elements are substituted
        back (`wyckoffgpt.analogues`): structure types the model learnt for neighbouring
        chemistries, in the requested one. Default 0: off.
    analogue_share: fraction of the samples drawn in analogue systems when `analogues` > 0, in
        [0, 1]. Default 0.5.
    analogue_source: "sampled" | "known". What the analogue samples are: "sampled" (default)
        drawn in the analogue systems and substituted back; "known": the Wyckoff skeletons (space
        group, sites and their elements) of the model's training crystals in the analogue systems,
        substituted back, each sample forcing one of them (nearest substitution first, then the most
        frequent, in turn) while the model draws its free coordinates and its cell. Needs the model
        folder's training crystals (`fingerprints.npz`).
    analogue_substitutions: with `analogue_source="known"`, how many of the requested system's
        elements an analogue system replaces at once, at most: 1 (default) takes the systems one
        element away, 2 also those two elements away (each replaced by one of its k nearest, ranked
        after all one-element replacements), which hold more of the structure types a new system
        has. An integer from 1 to the number of requested elements.
    analogue_repeats: the most samples drawn in one analogue (a known skeleton or an analogue
        system), a positive integer; the analogue share's samples beyond it are drawn in the
        requested system. A system has few known skeletons (a median of 10 for the recovery
        benchmark's systems), so without a cap a large run forces each of them many times. Default
        None: no cap.
    analogue_templates: with `analogue_source="known"`, the first sample drawn in each known
        skeleton is not drawn: it is the skeleton's training crystal of the nearest replacement, the
        replacing element(s) put back, cell and coordinates as they are (a substituted known crystal,
        flagged "template" in its results); the skeleton's later samples are the model's. Default
        False: the model draws every sample.
    """

    temperature: float = 1.0
    top_p: float | None = None
    batch_size: int = 256
    seed: int | None = None
    min_distance: float = DEFAULT_MIN_DISTANCE
    max_retries: int = 4
    charge_check: str = "ionic"
    symprec: float = DEFAULT_SYMPREC
    guidance: float = 1.0
    guidance_contrast: str = "opposite"
    analogues: int = 0
    analogue_share: float = 0.5
    analogue_source: str = "sampled"
    analogue_substitutions: int = 1
    analogue_repeats: int | None = None
    analogue_templates: bool = False

    def __post_init__(self) -> None:
        # One message per setting; the first out of range is reported.
        if not (_is_number(self.temperature) and 0 < self.temperature < math.inf):
            raise InputError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.batch_size) or self.batch_size <= 0:
            raise InputError(f"batch size must be a positive integer, got {self.batch_size}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise InputError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if not (_is_number(self.min_distance) and 0 <= self.min_distance < math.inf):
            raise InputError(f"minimum distance must be a finite number of Å >= 0, got {self.min_distance}")
        if not _is_int(self.max_retries) or self.max_retries < 0:
            raise InputError(f"max_retries must be a non-negative integer, got {self.max_retries}")
        if self.charge_check not in CHARGE_CHECKS:
            raise InputError(f"charge check must be one of {', '.join(CHARGE_CHECKS)}, got {self.charge_check!r}")
        if not (_is_number(self.symprec) and 0 < self.symprec < math.inf):
            raise InputError(f"symprec must be a finite number of Å > 0, got {self.symprec}")
        if not (_is_number(self.guidance) and 0 <= self.guidance < math.inf):
            raise InputError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if self.guidance_contrast not in GUIDANCE_CONTRASTS:
            raise InputError(f"guidance contrast must be one of {', '.join(GUIDANCE_CONTRASTS)}, "
                             f"got {self.guidance_contrast!r}")
        if not _is_int(self.analogues) or self.analogues < 0:
            raise InputError(f"analogues must be a non-negative integer, got {self.analogues}")
        if not (_is_number(self.analogue_share) and 0 <= self.analogue_share <= 1):
            raise InputError(f"analogue share must be in [0, 1], got {self.analogue_share}")
        if self.analogue_source not in ANALOGUE_SOURCES:
            raise InputError(f"analogue source must be one of {', '.join(ANALOGUE_SOURCES)}, got {self.analogue_source!r}")
        if not _is_int(self.analogue_substitutions) or self.analogue_substitutions < 1:
            raise InputError(f"analogue substitutions must be a positive integer, got {self.analogue_substitutions}")
        if self.analogue_substitutions > 1 and self.analogue_source != "known":
            raise InputError("analogue substitutions beyond 1 need the known analogue source (--analogue-source known)")
        if self.analogue_repeats is not None and not (_is_int(self.analogue_repeats) and self.analogue_repeats > 0):
            raise InputError(f"analogue repeats must be a positive integer, got {self.analogue_repeats}")
        if not isinstance(self.analogue_templates, bool):
            raise InputError(f"analogue templates must be true or false, got {self.analogue_templates!r}")
        if self.analogue_templates and self.analogue_source != "known":
            raise InputError("analogue templates need the known analogue source (--analogue-source known)")

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0

    def replace(self, **changes: object) -> SamplingConfig:
        """A copy with these fields changed, validated (TypeError naming an unknown field)."""
        unknown = [k for k in changes if k not in FIELD_NAMES]
        if unknown:
            raise TypeError(f"unknown sampling setting(s): {', '.join(unknown)} "
                            f"(SamplingConfig has {', '.join(FIELD_NAMES)})")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def resolve(cls, config: SamplingConfig | None = None, **overrides: object) -> SamplingConfig:
        """`config` (default: the defaults) with keyword `overrides` applied: how every sampling
        function takes both a config and keywords."""
        if config is not None and not isinstance(config, SamplingConfig):
            raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
        return (config or cls()).replace(**overrides)

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> SamplingConfig:
        """The sampling settings a model folder recommends (`SAMPLING_CONFIG_FILE`, written by
        `save_pretrained`) over the defaults; the defaults when the folder has none. InputError
        naming the file and the setting when it cannot be used."""
        path = Path(folder) / SAMPLING_CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            settings = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path} is not readable JSON: {e}") from None
        if not isinstance(settings, dict):
            raise InputError(f"{path} must hold a JSON object of sampling settings")
        unknown = [k for k in settings if k not in FIELD_NAMES or k in _PER_RUN_FIELDS]
        if unknown:
            raise InputError(f"{path}: {unknown[0]!r} is not a setting a model can recommend "
                             f"(one of {', '.join(k for k in FIELD_NAMES if k not in _PER_RUN_FIELDS)})")
        try:
            return cls(**settings)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the settings that differ from the defaults to `folder/SAMPLING_CONFIG_FILE`, as
        the model's recommendation (what `CrystalGenerator.from_pretrained` and generate.py then
        use unless told otherwise); the seed is a run's, not a model's, and is left out."""
        default = SamplingConfig()
        changed = {k: v for k, v in self.to_dict().items()
                   if k not in _PER_RUN_FIELDS and v != getattr(default, k)}
        path = Path(folder) / SAMPLING_CONFIG_FILE
        atomic_write(path, json.dumps(changed, indent=2) + "\n")
        return path


FIELD_NAMES = tuple(f.name for f in fields(SamplingConfig))
# A model folder's recommended sampling settings (transformers' generation_config.json, for sampling).
SAMPLING_CONFIG_FILE = "sampling_config.json"
_PER_RUN_FIELDS = ("seed",)


def check_num_samples(n: object) -> None:
    """InputError unless `n` (how many crystals to sample) is a positive integer."""
    if not _is_int(n) or n <= 0:
        raise InputError(f"number of samples must be a positive integer, got {n}")


def contrast_of(contrast: str, ehull: str) -> str:
    """"opposite" or "unknown": what guidance with `contrast` (SamplingConfig.guidance_contrast)
    contrasts a sequence of stability class `ehull` ("low" | "high") with."""
    if contrast == "unknown-for-low":
        return "unknown" if ehull == "low" else "opposite"
    return contrast


def contrast_token_map(vocab: Vocab, contrast: str) -> dict[int, int]:
    """Stability token id -> the contrast sequence's stability token id (see SamplingConfig.guidance)."""
    ids = vocab.token_to_id
    token = {c: ids[STABILITY_TOKENS[c]] for c in ("low", "high")}
    unknown = ids[STABILITY_TOKENS[None]]
    opposite = {"low": "high", "high": "low"}
    return {token[c]: unknown if contrast_of(contrast, c) == "unknown" else token[opposite[c]] for c in token}


@dataclass
class SampledBatch:
    """Token ids and values per row (each row ends with <eos>, or is cut at `max_new_tokens`)."""

    ids: list[np.ndarray]
    values: list[np.ndarray]
    n_new_tokens: int  # tokens drawn, resampled ones included (not counting forced prompt tokens or padding)
    retries: list[int]  # per row: how often it was sent back to an earlier site


def forced_prefix(parser: SequenceParser) -> list[int]:
    """Leading tokens the grammar allows exactly one of (the conditioning prompt); feeds them."""
    prefix = []
    while not parser.done:
        allowed = np.flatnonzero(parser.allowed_mask())
        if len(allowed) != 1 or int(allowed[0]) in parser.vocab.value_ids:
            break
        parser.feed(int(allowed[0]))
        prefix.append(int(allowed[0]))
    return prefix


def resume_point(parser: SequenceParser, threshold: float) -> int | None:
    """Where to sample a finished sequence again when its crystal has atoms closer than `threshold`
    Å: the first token of the earliest site that completes a clash (everything before it is
    clash-free; no later token can undo the clash except a much larger cell), or of the lattice when
    the cell is too small for even one atom; None when nothing clashes."""
    desc = parser.description()
    try:
        lattice, cart = description_cell(desc)
    except DecodeError:
        return None  # left to the decoder's own error report
    if shortest_lattice_vector(lattice) < threshold:
        return parser.lattice_start
    pairs = close_pairs((lattice, cart), threshold)
    if not len(pairs):
        return None
    site_of_atom = np.repeat(np.arange(len(desc.sites)), [s.position.multiplicity for s in desc.sites])
    return parser.site_starts[int(site_of_atom[pairs].max(axis=1).min())]


def draw_tokens(logits: torch.Tensor, allowed: torch.Tensor | None, temperature: float, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits (B, V) restricted to `allowed` (B, V) bool."""
    logits = logits.float() / temperature
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p; the most likely token always stays.
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # Inverse-CDF draw: one uniform per row, several times cheaper than torch.multinomial here.
    gen_device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[0], 1, generator=generator, device=gen_device).to(probs.device)
    cdf = probs.cumsum(dim=-1)
    # right=True never lands on a zero-probability token; rounding at the top end is clamped to the
    # last token that has probability.
    tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    last = torch.where(probs > 0, torch.arange(probs.shape[1], device=probs.device), -1).amax(dim=-1)
    return torch.minimum(tok, last)


@dataclass
class _Rows:
    """The rows of one `Sampler.sample` call: tokens and values so far, each row's parser (None: the
    grammar is off) and how often it was sent back."""

    ids: list[list[int]]
    values: list[list[float]]
    parsers: list[SequenceParser] | None
    retries: list[int]
    prompt_len: int
    max_new_tokens: int | None  # the length of every row when the grammar is off
    contrast: dict[int, int] | None = None  # guidance: stability token -> the contrast sequence's

    def result(self, n_new_tokens: int) -> SampledBatch:
        return SampledBatch([np.array(i, dtype=np.int64) for i in self.ids],
                            [np.array(v, dtype=np.float64) for v in self.values], n_new_tokens, self.retries)


@dataclass
class _Live:
    """The rows of a round still drawing, as the model's inputs: left-padded ids, values, attention
    mask (None without padding) and running composition (None when the model reads none), all
    fed so far; `step_*` is what the next forward pass feeds (everything at first, then the
    newest token)."""

    rows: torch.Tensor  # index of each live row in `_Rows`
    ids: torch.Tensor
    vals: torch.Tensor
    mask: torch.Tensor | None
    comp: torch.Tensor | None
    step_ids: torch.Tensor = field(init=False)
    step_vals: torch.Tensor = field(init=False)
    step_comp: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        self.step_ids, self.step_vals, self.step_comp = self.ids, self.vals, self.comp

    def extend(self, tok: torch.Tensor, val: torch.Tensor, step_comp: torch.Tensor | None) -> None:
        """Append the drawn tokens (one per live row); they are the next step's input."""
        self.ids, self.vals = torch.cat([self.ids, tok[:, None]], 1), torch.cat([self.vals, val[:, None]], 1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        if self.comp is not None:
            self.comp = torch.cat([self.comp, step_comp], 1)
        self.step_ids, self.step_vals, self.step_comp = tok[:, None], val[:, None], step_comp

    def keep(self, idx: torch.Tensor) -> None:
        """Only the live rows at `idx` go on."""
        self.rows, self.ids, self.vals = self.rows[idx], self.ids[idx], self.vals[idx]
        self.step_ids, self.step_vals = self.step_ids[idx], self.step_vals[idx]
        if self.mask is not None:
            self.mask = self.mask[idx]
        if self.comp is not None:
            self.comp, self.step_comp = self.comp[idx], self.step_comp[idx]


def _with_contrast_rows(ids: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None, comp: torch.Tensor | None,
                        contrast: dict[int, int]) -> tuple[torch.Tensor, ...]:
    """The model inputs with a contrast copy of every row appended: the same tokens, the stability
    token swapped by `contrast` (guidance, see SamplingConfig)."""
    other = ids.clone()
    for token, replacement in contrast.items():
        other[ids == token] = replacement
    return (torch.cat([ids, other]), torch.cat([vals, vals]), None if mask is None else torch.cat([mask, mask]),
            None if comp is None else torch.cat([comp, comp]))


class KVCache:
    """The KV cache (the `transformers.Cache` methods the model and the sampler call) in two flat
    buffers per layer and tensor, used in turn: each step writes the grown keys and values (and
    each row selection the kept rows) into the other buffer as one contiguous block. The same
    copies as DynamicCache's torch.cat, without a new allocation per step and layer: those
    fragmented the heap, so that a sampling process's peak memory grew with each batch drawn.
    For sampling only (under no_grad: writes into a buffer have no gradient)."""

    def __init__(self) -> None:
        self._buffers: list[list[torch.Tensor]] = []  # per layer: [keys a, keys b, values a, values b]
        self._tensors: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: current keys, values
        self._turn: list[int] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._tensors[layer_idx][0].shape[2] if layer_idx < len(self._tensors) else 0

    def _block(self, layer: int, which: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous block of `shape` at the start of buffer `which` of `layer`, grown as needed."""
        need = math.prod(shape)
        buf = self._buffers[layer][which]
        if buf.numel() < need:
            buf = self._buffers[layer][which] = like.new_empty(need + need // 2)
        return buf[:need].view(shape)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self._tensors):
            self._buffers.append([k.new_empty(0) for _ in range(4)])
            self._tensors.append((k, v))
            self._turn.append(0)
            return k, v
        old_k, old_v = self._tensors[layer_idx]
        turn = self._turn[layer_idx] = 1 - self._turn[layer_idx]
        shape = old_k.shape[:2] + (old_k.shape[2] + k.shape[2],) + old_k.shape[3:]
        new_k = torch.cat([old_k, k], dim=2, out=self._block(layer_idx, turn, shape, k))
        new_v = torch.cat([old_v, v], dim=2, out=self._block(layer_idx, 2 + turn, shape, v))
        self._tensors[layer_idx] = (new_k, new_v)
        return new_k, new_v

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices` (finished rows leave the batch)."""
        for layer, (old_k, old_v) in enumerate(self._tensors):
            turn = self._turn[layer] = 1 - self._turn[layer]
            shape = (len(indices),) + old_k.shape[1:]
            self._tensors[layer] = (torch.index_select(old_k, 0, indices, out=self._block(layer, turn, shape, old_k)),
                                    torch.index_select(old_v, 0, indices, out=self._block(layer, 2 + turn, shape, old_v)))


class Sampler:
    """Draws sequences from a WyckoffGPT-like model: `model(input_ids, input_values, cache=,
    use_cache=)` returning `logits`, `last_hidden_state`, `cache`, and `model.sample_values`.

    `config` (a `SamplingConfig`, default its defaults) with keyword overrides, e.g.
    `Sampler(model, temperature=0.8, charge_check="off")`: the sampler uses the temperature,
    top_p, min_distance, max_retries and charge_check (batch_size and seed belong to the caller,
    who makes the parsers and the random generator). `use_cache=False` recomputes the whole
    sequence at every step (to check the cache, or time it)."""

    def __init__(self, model: torch.nn.Module, config: SamplingConfig | None = None, *, use_cache: bool = True,
                 **overrides: object):
        self.config = SamplingConfig.resolve(config, **overrides)
        self.model = model
        self.use_cache = use_cache
        self._is_value: torch.Tensor | None = None
        check = self.config.charge_check
        # A test of the finished site list: a row that fails it is drawn again after the prompt,
        # sharing the retry budget with clashes.
        self.accept_sites: Callable[[WyckoffDescription], bool] | None = (
            None if check == "off" else functools.partial(_passes_charge_check, check))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def sample(self, parsers: list[SequenceParser] | None, batch_size: int | None = None,
               prompt: list[int] | None = None, max_new_tokens: int | None = None,
               generator: torch.Generator | None = None,
               on_step: Callable[[int], None] | None = None, *,
               prefix: tuple[list[int], list[float]] | None = None) -> SampledBatch:
        """Sample one sequence per parser (fresh parsers; their conditions may differ if their forced
        prompts have one length, see `_feed_prompt`), until each has
        its <eos>. With `parsers=None` the grammar is off: `batch_size` rows of exactly
        `max_new_tokens` unconstrained tokens after `prompt` (used to time the model alone).
        `on_step(k)` is called after every step with the number of rows that finished for good.
        `prefix` (token ids and values, from <bos>): a prompt every row starts with, kept verbatim
        (resampling never goes back into it); the parsers must accept it."""
        if parsers is not None:
            prompts, prompt_values = _feed_prompt(parsers, prefix)
            batch_size = len(parsers)
        elif not prompt or not batch_size or not max_new_tokens:
            raise ValueError("without parsers, give prompt, batch_size and max_new_tokens")
        else:
            prompts, prompt_values = [prompt] * batch_size, [math.nan] * len(prompt)
        contrast = None
        if self.config.guided:
            if parsers is None:
                raise ValueError("guidance needs the grammar (parsers): it acts on the stability token")
            contrast = contrast_token_map(parsers[0].vocab, self.config.guidance_contrast)
        rows = _Rows([list(p) for p in prompts], [list(prompt_values) for _ in range(batch_size)],
                     parsers, [0] * batch_size, len(prompt_values), max_new_tokens, contrast)
        if parsers is not None and parsers[0].done:  # the prompt is a whole sequence
            return rows.result(0)
        pending, n_new = list(range(batch_size)), 0
        # Rows sent back to an earlier site (see _resample_from) are sampled again in a later round,
        # left-padded to a common length.
        while pending:
            pending, n = self._round(pending, rows, generator, on_step)
            n_new += n
        return rows.result(n_new)

    def _round(self, pending: list[int], rows: _Rows, generator: torch.Generator | None,
               on_step: Callable[[int], None] | None) -> tuple[list[int], int]:
        """Continue the `pending` rows from their current tokens to <eos>; returns the rows to
        resample and the number of tokens drawn."""
        cache = KVCache() if self.use_cache else None
        live, n_new, again = self._open_round(pending, rows), 0, []
        while len(live.rows):
            logits, hidden, cache = self._forward(live, cache, rows.contrast)
            live_rows = live.rows.tolist()
            tok, val = self._draw(logits, hidden, live_rows, rows.parsers, generator)
            n_new += len(live_rows)
            sent_back = len(again)
            finished = [self._append(r, t, v, rows, again) for r, t, v in zip(live_rows, tok.tolist(), val.tolist())]
            if on_step is not None:
                on_step(sum(finished) - (len(again) - sent_back))  # rows finished for good
            live.extend(tok, val, self._step_composition(live_rows, rows.parsers, live.comp))
            keep = ~torch.tensor(finished, device=live.ids.device)
            if not keep.all():
                # Finished rows leave the batch (and the cache) instead of being padded along.
                idx = keep.nonzero().squeeze(1)
                n_live = len(live.rows)
                live.keep(idx)
                if cache is not None and len(live.rows):
                    # With guidance the cache holds the contrast rows after the live ones.
                    cache.batch_select_indices(idx if rows.contrast is None else torch.cat([idx, idx + n_live]))
        return again, n_new

    def _open_round(self, pending: list[int], rows: _Rows) -> _Live:
        """The pending rows as the model's inputs, left-padded to a common length."""
        config, dev = self.model.config, self.device
        width = max(len(rows.ids[r]) for r in pending)
        pads = [width - len(rows.ids[r]) for r in pending]
        ids = torch.tensor([[config.pad_token_id] * k + rows.ids[r] for k, r in zip(pads, pending)],
                           dtype=torch.long, device=dev)
        # Values stay float64 so that a value clamped to a bound is exactly what the parser checks.
        vals = torch.tensor([[math.nan] * k + rows.values[r] for k, r in zip(pads, pending)], dtype=torch.float64,
                            device=dev)
        mask = None
        if any(pads):
            mask = torch.tensor([[0] * k + [1] * (width - k) for k in pads], dtype=torch.long, device=dev)
        comp = None
        slots, charge = self._composition_inputs
        if slots:
            comp = torch.zeros((len(pending), width, feature_size(slots, charge)), dtype=torch.float32, device=dev)
            if rows.parsers is not None:
                for i, (k, r) in enumerate(zip(pads, pending)):
                    comp[i, k:] = torch.from_numpy(sequence_features(rows.parsers[r].vocab, rows.ids[r], slots,
                                                                     charge))
        return _Live(torch.tensor(pending, device=dev), ids, vals, mask, comp)

    @property
    def _composition_inputs(self) -> tuple[int, bool]:
        """The model's composition slots (0: it reads no running composition) and charge feature."""
        config = self.model.config
        return getattr(config, "composition_slots", 0), getattr(config, "charge_feature", False)

    def _forward(self, live: _Live, cache: object,
                 contrast: dict[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, object]:
        """The last position's logits and hidden state per live row, and the updated cache. With
        `contrast` (guidance) the contrast sequences run in the same batch, after the live rows, and
        the logits are the guided ones."""
        if self.use_cache:
            inputs = (live.step_ids, live.step_vals, live.mask, live.step_comp)
        else:
            inputs = (live.ids, live.vals, live.mask, live.comp)
        if contrast is not None:
            inputs = _with_contrast_rows(*inputs, contrast)
        ids, vals, mask, comp = inputs
        if self.use_cache:
            out = self.model(ids, vals, attention_mask=mask, cache=cache, use_cache=True, composition=comp)
            cache = out.cache
        else:
            out = self.model(ids, vals, attention_mask=mask, composition=comp)
        logits, hidden = out.logits[:, -1], out.last_hidden_state[:, -1]
        if contrast is not None:
            n = len(live.rows)
            conditioned, other = logits[:n].float(), logits[n:].float()
            logits, hidden = other + self.config.guidance * (conditioned - other), hidden[:n]
        return logits, hidden, cache

    def _draw(self, logits: torch.Tensor, hidden: torch.Tensor, live_rows: list[int],
              parsers: list[SequenceParser] | None,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per live row within its grammar, and a value for each value token (NaN for the
        others)."""
        dev = logits.device
        allowed = None
        if parsers is not None:
            allowed = torch.from_numpy(np.stack([parsers[r].allowed_mask() for r in live_rows])).to(dev)
        tok = draw_tokens(logits, allowed, self.config.temperature, self.config.top_p, generator)
        val = torch.full(tok.shape, math.nan, dtype=torch.float64, device=dev)
        has_value = self._value_tokens()[tok]
        if has_value.any():
            sel = has_value.nonzero().squeeze(1)
            val[sel] = self._values(hidden[sel], tok[sel], [live_rows[i] for i in sel.tolist()], parsers, generator)
        return tok, val

    def _value_tokens(self) -> torch.Tensor:
        """(V,) bool on the model's device: which tokens carry a value."""
        if self._is_value is None or self._is_value.device != self.device:
            config = self.model.config
            self._is_value = torch.zeros(config.vocab_size, dtype=torch.bool, device=self.device)
            self._is_value[config.coord_token_ids + config.length_token_ids + config.angle_token_ids] = True
        return self._is_value

    def _append(self, row: int, token: int, value: float, rows: _Rows, again: list[int]) -> bool:
        """Add a drawn token to its row; whether the row leaves this round (it has its <eos>, or it
        was sent back to an earlier site and appended to `again`)."""
        rows.ids[row].append(token)
        rows.values[row].append(value)
        if rows.parsers is None:
            return len(rows.ids[row]) - rows.prompt_len >= rows.max_new_tokens
        rows.parsers[row].feed(token, value)
        if not rows.parsers[row].done:
            return False
        if rows.retries[row] < self.config.max_retries and self._resample_from(row, rows):
            rows.retries[row] += 1
            again.append(row)
        return True

    def _step_composition(self, live_rows: list[int], parsers: list[SequenceParser] | None,
                          comp: torch.Tensor | None) -> torch.Tensor | None:
        """The running composition after each live row's newest token (None when the model reads none)."""
        if comp is None:
            return None
        slots, charge = self._composition_inputs
        step_comp = torch.zeros((len(live_rows), 1, comp.shape[2]), dtype=comp.dtype, device=comp.device)
        if parsers is not None:
            step_comp[:, 0] = torch.from_numpy(np.stack([parser_features(parsers[r], slots, charge)
                                                         for r in live_rows]))
        return step_comp

    def _resample_from(self, row: int, rows: _Rows) -> bool:
        """If the finished row's sites fail `accept_sites`, cut it back to the end of the prompt (the
        conditions); else if its crystal has atoms closer than `min_distance`, cut it back to where the
        clash begins (see `resume_point`). Rewinds the parser and returns True when the row was cut."""
        parser = rows.parsers[row]
        cut = None
        if self.accept_sites is not None and not self.accept_sites(parser.description()):
            # Back to the prompt rather than the first site: the chemistry and space group the model
            # chose may admit no accepted site list, and a whole new draw is plain rejection sampling.
            cut = rows.prompt_len
        elif self.config.min_distance:
            cut = resume_point(parser, self.config.min_distance)
            if cut is not None:
                cut = max(cut, rows.prompt_len)  # the prompt stays as given
        if cut is None or cut >= len(rows.ids[row]):
            return False
        fresh = SequenceParser(parser.vocab, parser.limits, parser.conditions)
        del rows.ids[row][cut:], rows.values[row][cut:]
        for t, v in zip(rows.ids[row], rows.values[row]):
            fresh.feed(t, v)
        rows.parsers[row] = fresh
        return True

    def _values(self, hidden: torch.Tensor, tok: torch.Tensor, rows: list[int],
                parsers: list[SequenceParser] | None, generator: torch.Generator | None) -> torch.Tensor:
        """Values for value tokens, redrawn then clamped into each row's grammar bounds."""
        val = self.model.sample_values(hidden, tok, self.config.temperature, generator).double()
        if parsers is None:
            return val
        bounds = torch.tensor([parsers[r].value_bounds(t) for r, t in zip(rows, tok.tolist())],
                              dtype=val.dtype, device=val.device)
        lo, hi = bounds[:, 0], bounds[:, 1]
        for _ in range(VALUE_REDRAWS):
            bad = ~((val >= lo) & (val <= hi))  # also catches NaN
            if not bad.any():
                break
            sel = bad.nonzero().squeeze(1)
            val[sel] = self.model.sample_values(hidden[sel], tok[sel], self.config.temperature, generator).double()
        mid = torch.where(torch.isfinite(hi), (lo + hi) / 2, lo + 1.0)
        val = torch.where(torch.isnan(val), mid, val)
        val = torch.minimum(torch.maximum(val, lo), hi)
        if self.config.min_distance:
            for k, (r, t) in enumerate(zip(rows, tok.tolist())):
                floor = self._separating_floor(parsers[r], t, float(val[k]))
                if floor is None:
                    continue
                for _ in range(GEOMETRY_REDRAWS):
                    redraw = float(self.model.sample_values(hidden[k:k + 1], tok[k:k + 1], self.config.temperature,
                                                            generator)[0])
                    if redraw >= floor:
                        val[k] = redraw
                        break
        return val

    def _separating_floor(self, parser: SequenceParser, token_id: int, value: float) -> float | None:
        """The smallest clash-free value when `value` of this last cell length would let atoms clash;
        None when it does not, or when the length cannot help (see the module docstring)."""
        name = parser.vocab.tokens[token_id]
        group = parser.group
        if SEPARABLE.get(group.crystal_system) != name or len(parser.lattice) != len(group.lattice_free) - 1:
            return None
        floor = separating_length(group, parser.sites, {**parser.lattice, name: value}, name, self.config.min_distance)
        return None if floor is None or floor <= value else floor


def _feed_prompt(parsers: list[SequenceParser],
                 prefix: tuple[list[int], list[float]] | None) -> tuple[list[list[int]], list[float]]:
    """Feed every parser the given prefix and then the tokens the grammar forces; returns each row's
    prompt ids and the prompt's values. Rows may have different conditions (analogue systems or
    known skeletons, see `wyckoffgpt.analogues`): the prompt is then as long as the shortest row's
    forced tokens, and the grammar forces the rest of each row's as it samples (no padding)."""
    given_ids, given_values = (list(prefix[0]), list(prefix[1])) if prefix is not None else ([], [])
    forced_by_conditions: dict[object, list[int]] = {}
    for p in parsers:
        if p.conditions not in forced_by_conditions:
            scratch = SequenceParser(p.vocab, p.limits, p.conditions)
            for t, v in zip(given_ids, given_values):
                scratch.feed(int(t), v)
            forced_by_conditions[p.conditions] = forced_prefix(scratch)
    common = min(len(f) for f in forced_by_conditions.values())
    prompts = []
    for p in parsers:
        forced = forced_by_conditions[p.conditions][:common]
        for t, v in zip(given_ids, given_values):
            p.feed(int(t), v)
        for t in forced:
            p.feed(t)
        prompts.append(given_ids + forced)
    return prompts, given_values + [math.nan] * (len(prompts[0]) - len(given_values))


def _passes_charge_check(charge_check: str, desc: WyckoffDescription) -> bool:
    return passes_charge_check(description_composition(desc), charge_check)
