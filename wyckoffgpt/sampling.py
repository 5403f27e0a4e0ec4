"""Batched autoregressive sampling with the model's KV cache, under the sequence grammar.

One step: mask the logits with each row's `SequenceParser.allowed_mask()` (so no row can reach a
dead end), divide by the temperature, optionally cut to the top-p nucleus, draw the token, then draw
its value from the value head (`model.sample_values`, which applies the same temperature to the
mixture) and feed only the new token through the model, reusing the cache.

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

Optionally (`accept_sites`, e.g. charge balance) a finished row whose site list fails a test is drawn
again from the end of the prompt (the forced conditions), within the same retry budget: rejection
sampling of the model's distribution restricted to accepted crystals.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .composition import feature_size, parser_features, sequence_features
from .decode import SEPARABLE, close_pairs, separating_length, shortest_lattice_vector, to_structure
from .grammar import DecodeError, SequenceParser, WyckoffDescription

VALUE_REDRAWS = 4
GEOMETRY_REDRAWS = 8
MAX_RETRIES = 4


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
        structure = to_structure(desc)
    except DecodeError:
        return None  # left to the decoder's own error report
    if shortest_lattice_vector(structure.lattice) < threshold:
        return parser.lattice_start
    pairs = close_pairs(structure, threshold)
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


class Sampler:
    """Draws sequences from a WyckoffGPT-like model: `model(input_ids, input_values, cache=,
    use_cache=)` returning `logits`, `last_hidden_state`, `cache`, and `model.sample_values`."""

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, top_p: float | None = None,
                 use_cache: bool = True, min_distance: float | None = None, max_retries: int = MAX_RETRIES,
                 accept_sites: Callable[[WyckoffDescription], bool] | None = None):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.max_retries = max_retries
        self.model = model
        self.temperature = temperature
        self.top_p = top_p
        self.use_cache = use_cache
        self.min_distance = min_distance
        # A test of the finished site list (e.g. charge balance): a row that fails it is drawn again
        # after the prompt, sharing the retry budget with clashes.
        self.accept_sites = accept_sites

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def sample(self, parsers: list[SequenceParser] | None, batch_size: int | None = None,
               prompt: list[int] | None = None, max_new_tokens: int | None = None,
               generator: torch.Generator | None = None,
               on_step: Callable[[int], None] | None = None, *,
               prefix: tuple[list[int], list[float]] | None = None) -> SampledBatch:
        """Sample one sequence per parser (fresh parsers sharing the same conditions), until each has
        its <eos>. With `parsers=None` the grammar is off: `batch_size` rows of exactly
        `max_new_tokens` unconstrained tokens after `prompt` (used to time the model alone).
        `on_step(k)` is called after every step with the number of rows that finished for good.
        `prefix` (token ids and values, from <bos>): a prompt every row starts with, kept verbatim
        (resampling never goes back into it); the parsers must accept it."""
        prompt_values: list[float] = []
        if parsers is not None:
            # The forced prefix is the same for every row: one prompt, no padding.
            given_ids, given_values = (list(prefix[0]), list(prefix[1])) if prefix is not None else ([], [])
            for p in parsers:
                for t, v in zip(given_ids, given_values):
                    p.feed(int(t), v)
            forced = forced_prefix(parsers[0])
            for p in parsers[1:]:
                for t in forced:
                    p.feed(t)
            prompt = given_ids + forced
            prompt_values = given_values + [math.nan] * len(forced)
            batch_size = len(parsers)
        elif not prompt or not batch_size or not max_new_tokens:
            raise ValueError("without parsers, give prompt, batch_size and max_new_tokens")
        else:
            prompt_values = [math.nan] * len(prompt)
        out_ids = [list(prompt) for _ in range(batch_size)]
        out_vals: list[list[float]] = [list(prompt_values) for _ in range(batch_size)]
        if parsers is not None and parsers[0].done:  # the prompt is a whole sequence
            return SampledBatch([np.array(i, dtype=np.int64) for i in out_ids],
                                [np.array(v, dtype=np.float64) for v in out_vals], 0, [0] * batch_size)
        retries = [0] * batch_size
        pending, n_new = list(range(batch_size)), 0
        # Rows sent back to an earlier site (see _resume_point) are sampled again in a later round,
        # left-padded to a common length.
        while pending:
            pending, n = self._round(pending, out_ids, out_vals, parsers, retries, len(prompt), max_new_tokens,
                                     generator, on_step)
            n_new += n
        return SampledBatch([np.array(i, dtype=np.int64) for i in out_ids],
                            [np.array(v, dtype=np.float64) for v in out_vals], n_new, retries)

    def _round(self, rows: list[int], out_ids: list[list[int]], out_vals: list[list[float]],
               parsers: list[SequenceParser] | None, retries: list[int], prompt_len: int,
               max_new_tokens: int | None, generator: torch.Generator | None,
               on_step: Callable[[int], None] | None) -> tuple[list[int], int]:
        """Continue `rows` from their current tokens to <eos>; returns the rows to resample and the
        number of tokens drawn."""
        model, dev = self.model, self.device
        config = model.config
        value_ids = config.coord_token_ids + config.length_token_ids + config.angle_token_ids
        is_value = torch.zeros(config.vocab_size, dtype=torch.bool, device=dev)
        is_value[value_ids] = True

        width = max(len(out_ids[r]) for r in rows)
        pads = [width - len(out_ids[r]) for r in rows]
        ids = torch.tensor([[config.pad_token_id] * k + out_ids[r] for k, r in zip(pads, rows)], dtype=torch.long,
                           device=dev)
        # Values stay float64 so that a value clamped to a bound is exactly what the parser checks.
        vals = torch.tensor([[math.nan] * k + out_vals[r] for k, r in zip(pads, rows)], dtype=torch.float64,
                            device=dev)
        mask = None
        if any(pads):
            mask = torch.tensor([[0] * k + [1] * (width - k) for k in pads], dtype=torch.long, device=dev)
        slots = getattr(config, "composition_slots", 0)
        charge = getattr(config, "charge_feature", False)
        comp = None
        if slots:
            comp = torch.zeros((len(rows), width, feature_size(slots, charge)), dtype=torch.float32, device=dev)
            if parsers is not None:
                for i, (k, r) in enumerate(zip(pads, rows)):
                    comp[i, k:] = torch.from_numpy(sequence_features(parsers[r].vocab, out_ids[r], slots, charge))
        live_rows = torch.tensor(rows, device=dev)  # original index of each live row
        cache, step_ids, step_vals, step_comp, n_new, again = None, ids, vals, comp, 0, []
        while len(live_rows):
            if self.use_cache:
                out = model(step_ids, step_vals, attention_mask=mask, cache=cache, use_cache=True,
                            composition=step_comp)
                cache = out.cache
            else:
                out = model(ids, vals, attention_mask=mask, composition=comp)
            logits, hidden = out.logits[:, -1], out.last_hidden_state[:, -1]
            live = live_rows.tolist()
            allowed = None
            if parsers is not None:
                allowed = torch.from_numpy(np.stack([parsers[r].allowed_mask() for r in live])).to(dev)
            tok = draw_tokens(logits, allowed, self.temperature, self.top_p, generator)
            val = torch.full(tok.shape, math.nan, dtype=torch.float64, device=dev)
            has_value = is_value[tok]
            if has_value.any():
                sel = has_value.nonzero().squeeze(1)
                val[sel] = self._values(hidden[sel], tok[sel], [live[i] for i in sel.tolist()], parsers, generator)
            n_new += len(live)
            tok_l, val_l = tok.tolist(), val.tolist()
            finished, n_final = [], 0
            for i, r in enumerate(live):
                out_ids[r].append(tok_l[i])
                out_vals[r].append(val_l[i])
                if parsers is None:
                    done = len(out_ids[r]) - prompt_len >= max_new_tokens
                else:
                    parsers[r].feed(tok_l[i], val_l[i])
                    done = parsers[r].done
                    if done and retries[r] < self.max_retries and self._resample_from(r, out_ids, out_vals, parsers,
                                                                                       prompt_len):
                        retries[r] += 1
                        again.append(r)
                        finished.append(True)  # leaves this round, not the sample
                        continue
                finished.append(done)
                n_final += done
            if on_step is not None:
                on_step(n_final)
            ids, vals = torch.cat([ids, tok[:, None]], 1), torch.cat([vals, val[:, None]], 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if comp is not None:
                step_comp = torch.zeros((len(live), 1, comp.shape[2]), dtype=comp.dtype, device=dev)
                if parsers is not None:
                    step_comp[:, 0] = torch.from_numpy(np.stack([parser_features(parsers[r], slots, charge) for r in live]))
                comp = torch.cat([comp, step_comp], 1)
            keep = ~torch.tensor(finished, device=dev)
            if not keep.all():
                # Finished rows leave the batch (and the cache) instead of being padded along.
                idx = keep.nonzero().squeeze(1)
                live_rows, ids, vals, tok, val = live_rows[idx], ids[idx], vals[idx], tok[idx], val[idx]
                if mask is not None:
                    mask = mask[idx]
                if comp is not None:
                    comp, step_comp = comp[idx], step_comp[idx]
                if cache is not None and len(live_rows):
                    cache.batch_select_indices(idx)
            step_ids, step_vals = tok[:, None], val[:, None]
        return again, n_new

    def _resample_from(self, row: int, out_ids: list[list[int]], out_vals: list[list[float]],
                       parsers: list[SequenceParser], prompt_len: int) -> bool:
        """If the finished row's sites fail `accept_sites`, cut it back to the end of the prompt (the
        conditions); else if its crystal has atoms closer than `min_distance`, cut it back to where the
        clash begins (see `resume_point`). Rewinds the parser and returns True when the row was cut."""
        parser = parsers[row]
        cut = None
        if self.accept_sites is not None and not self.accept_sites(parser.description()):
            # Back to the prompt rather than the first site: the chemistry and space group the model
            # chose may admit no accepted site list, and a whole new draw is plain rejection sampling.
            cut = prompt_len
        elif self.min_distance:
            cut = resume_point(parser, self.min_distance)
            if cut is not None:
                cut = max(cut, prompt_len)  # the prompt stays as given
        if cut is None or cut >= len(out_ids[row]):
            return False
        fresh = SequenceParser(parser.vocab, parser.limits, parser.conditions)
        del out_ids[row][cut:], out_vals[row][cut:]
        for t, v in zip(out_ids[row], out_vals[row]):
            fresh.feed(t, v)
        parsers[row] = fresh
        return True

    def _values(self, hidden: torch.Tensor, tok: torch.Tensor, rows: list[int],
                parsers: list[SequenceParser] | None, generator: torch.Generator | None) -> torch.Tensor:
        """Values for value tokens, redrawn then clamped into each row's grammar bounds."""
        val = self.model.sample_values(hidden, tok, self.temperature, generator).double()
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
            val[sel] = self.model.sample_values(hidden[sel], tok[sel], self.temperature, generator).double()
        mid = torch.where(torch.isfinite(hi), (lo + hi) / 2, lo + 1.0)
        val = torch.where(torch.isnan(val), mid, val)
        val = torch.minimum(torch.maximum(val, lo), hi)
        if self.min_distance:
            for k, (r, t) in enumerate(zip(rows, tok.tolist())):
                floor = self._separating_floor(parsers[r], t, float(val[k]))
                if floor is None:
                    continue
                for _ in range(GEOMETRY_REDRAWS):
                    redraw = float(self.model.sample_values(hidden[k:k + 1], tok[k:k + 1], self.temperature,
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
        floor = separating_length(group, parser.sites, {**parser.lattice, name: value}, name, self.min_distance)
        return None if floor is None or floor <= value else floor
