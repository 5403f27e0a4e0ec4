"""WyckoffGPT: a causal transformer over Wyckoff-position token sequences with a discrete token head and
a continuous value head.

Read top to bottom: value kinds and their distributions, the input embedding, the decoder blocks, the
value head, then the model. Only relative imports of the configuration file, so `save_pretrained` can
copy both files next to the weights for `trust_remote_code=True` loading.

Value convention: `input_values[b, t]` is the value carried by token `input_ids[b, t]` (NaN when that
token is not a value token). The value head at position t predicts the value of token t+1, conditioned
on the hidden state at t and on the embedding of token t+1 (teacher forced in training; sampled first
in generation), so it knows which kind of value (coordinate, length, angle) it must produce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput

from .configuration_wyckoffgpt import WyckoffGPTConfig

# Value kinds, as stored in the per-token kind table.
NOT_VALUE, COORD, LENGTH, ANGLE = 0, 1, 2, 3
KIND_NAMES = {COORD: "coord", LENGTH: "length", ANGLE: "angle"}

ANGLE_MAX = 180.0
# Mixture components start at fixed offsets so they do not all learn the same thing; lengths are
# modelled as log(Å) around a typical cell length, angles as logit(angle / 180) (0 is 90°).
LOG_LENGTH_CENTER = math.log(5.0)
COORD_SIGMA_RANGE = (1e-3, 0.5)  # wrapped normal: beyond 0.5 it is practically uniform on the circle
MIN_SIGMA = 1e-3
WRAPS = 3  # images summed on each side for the wrapped normal; exact to ~1e-19 for sigma <= 0.5
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _normal_log_pdf(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mu) / sigma) ** 2 - torch.log(sigma) - LOG_SQRT_2PI


def _wrap_unit(x: torch.Tensor) -> torch.Tensor:
    """x mod 1 in [0, 1): float rounding can turn a tiny negative remainder into exactly 1.0."""
    x = torch.remainder(x, 1.0)
    return torch.where(x >= 1.0, torch.zeros_like(x), x)


# ----------------------------------------------------------------------------------------------------
# Input embedding of values: the paper's Gaussian basis (IV.B) on a linear and a log scale, projected.


class ValueEmbedding(nn.Module):
    def __init__(self, config: WyckoffGPTConfig) -> None:
        super().__init__()
        self.n_basis = config.value_basis_size
        self.sigma_lin = config.value_basis_sigma_lin
        self.sigma_log = config.value_basis_sigma_log
        self.log_max = config.value_log_max
        self.length_scale = config.length_scale
        self.proj = nn.Linear(2 * self.n_basis, config.n_embd)

    def forward(self, values: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        # Centres are rebuilt each call rather than kept as buffers: cheap, and nothing to initialise
        # when transformers materialises the model from the meta device.
        values = values.float()
        c_lin = torch.linspace(0.0, 1.0, self.n_basis, device=values.device)
        c_log = torch.linspace(0.0, self.log_max, self.n_basis, device=values.device)
        # Bring each kind to roughly [0, 1] for the linear basis; the log basis sees the raw value.
        scale = torch.where(kinds == LENGTH, self.length_scale, torch.where(kinds == ANGLE, ANGLE_MAX, 1.0))
        u = values / scale
        x_lin = torch.exp(-((u.unsqueeze(-1) - c_lin) ** 2) / (2 * self.sigma_lin**2))
        log_v = torch.log(values.abs() + 1e-20).abs()
        x_log = torch.exp(-((log_v.unsqueeze(-1) - c_log) ** 2) / (2 * self.sigma_log**2))
        return self.proj(torch.cat([x_lin, x_log], dim=-1))


def sinusoidal_positions(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Classic sin/cos encoding (paper IV.B), computed on the fly for any position."""
    inv_freq = torch.exp(
        -math.log(10000.0) * torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim
    )
    angles = position_ids.float().unsqueeze(-1) * inv_freq
    pe = torch.zeros(*position_ids.shape, dim, device=position_ids.device)
    pe[..., 0::2] = torch.sin(angles)
    pe[..., 1::2] = torch.cos(angles)[..., : dim // 2]
    return pe


# ----------------------------------------------------------------------------------------------------
# Decoder blocks: pre-LayerNorm, causal SDPA attention with a KV cache, GELU MLP.


class CausalSelfAttention(nn.Module):
    def __init__(self, config: WyckoffGPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, cache: Cache | None
    ) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    def __init__(self, config: WyckoffGPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd)
        self.out_proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out_proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: WyckoffGPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, cache: Cache | None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, cache)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------
# Continuous head: distribution of the next token's value given the hidden state and the next token.


class ValueHead(nn.Module):
    """Outputs, per value kind, either mixture parameters (K weights, K means, K widths) or one point
    estimate (the paper's MSE regression, `continuous_head="mse"`)."""

    def __init__(self, config: WyckoffGPTConfig) -> None:
        super().__init__()
        self.mixture = config.continuous_head == "mixture"
        self.k = config.n_mixture
        self.per_kind = 3 * self.k if self.mixture else 1
        self.fc = nn.Linear(2 * config.n_embd, config.n_embd)
        self.out = nn.Linear(config.n_embd, 3 * self.per_kind)

    def raw(self, hidden: torch.Tensor, next_embedding: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """(N, per_kind) raw outputs for each row's kind (rows that are not values get the coord slot)."""
        z = self.out(F.gelu(self.fc(torch.cat([hidden, next_embedding], dim=-1)))).float()
        z = z.view(-1, 3, self.per_kind)
        slot = (kinds.clamp(min=1) - 1).view(-1, 1, 1).expand(-1, 1, self.per_kind)
        return z.gather(1, slot).squeeze(1)

    def mixture_params(self, raw: torch.Tensor, kinds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Component log-weights, means and widths in each kind's modelled variable: the coordinate
        itself (wrapped normal), log(length / Å) and logit(angle / 180°) (Gaussians)."""
        k = self.k
        logits, mu_raw, s_raw = raw[:, :k], raw[:, k : 2 * k], raw[:, 2 * k :]
        steps = torch.arange(k, device=raw.device, dtype=raw.dtype)
        frac = (steps + 0.5) / k
        kind = kinds.unsqueeze(-1)
        offset = torch.where(
            kind == COORD,
            frac,
            torch.where(kind == LENGTH, LOG_LENGTH_CENTER + 2.0 * (frac - 0.5), 3.0 * (frac - 0.5)),
        )
        mu = mu_raw + offset
        mu = torch.where(kind == COORD, _wrap_unit(mu), mu)
        lo, hi = COORD_SIGMA_RANGE
        sigma = torch.where(kind == COORD, lo + (hi - lo) * torch.sigmoid(s_raw), MIN_SIGMA + F.softplus(s_raw - 1.0))
        return torch.log_softmax(logits, dim=-1), mu, sigma

    def point_estimate(self, raw: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """MSE head: prediction in the regressed variable (coordinate, log length, logit angle)."""
        r = raw[:, 0]
        return torch.where(kinds == COORD, torch.sigmoid(r), torch.where(kinds == LENGTH, LOG_LENGTH_CENTER + r, r))


def _to_modelled(values: torch.Tensor, kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Modelled variable y and log|dy/dvalue| for natural-unit values (coords unchanged)."""
    length = values.clamp(min=1e-6)
    p = (values / ANGLE_MAX).clamp(1e-6, 1 - 1e-6)
    y = torch.where(kinds == LENGTH, torch.log(length), torch.where(kinds == ANGLE, torch.logit(p), _wrap_unit(values)))
    log_jac = torch.where(
        kinds == LENGTH,
        -torch.log(length),
        torch.where(kinds == ANGLE, -math.log(ANGLE_MAX) - torch.log(p) - torch.log1p(-p), torch.zeros_like(values)),
    )
    return y, log_jac


def _from_modelled(y: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    # Clamps keep float32 results strictly inside each kind's open range.
    length = torch.exp(y.clamp(-20.0, 20.0))
    angle = (ANGLE_MAX * torch.sigmoid(y)).clamp(1e-4, ANGLE_MAX - 1e-4)
    return torch.where(kinds == LENGTH, length, torch.where(kinds == ANGLE, angle, _wrap_unit(y)))


# ----------------------------------------------------------------------------------------------------
# The model.


@dataclass
class WyckoffGPTOutput(ModelOutput):
    """`loss` is the batch loss normalised by its own number of target tokens; the `*_sum` fields and
    counts let a training loop normalise over several micro-batches and processes instead.

    The KV cache is the field `cache`: transformers 5.24 renamed `past_key_values` to `cache` in every
    `ModelOutput` constructor (a metaclass rewrites the keyword), so a field of the old name can no
    longer be filled there, while a field named `cache` works on every 5.x. The `past_key_values`
    property keeps the old attribute readable on all of them."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    loss_sum: torch.Tensor | None = None
    token_loss_sum: torch.Tensor | None = None
    coord_loss_sum: torch.Tensor | None = None
    length_loss_sum: torch.Tensor | None = None
    angle_loss_sum: torch.Tensor | None = None
    n_tokens: torch.Tensor | None = None
    n_coord: torch.Tensor | None = None
    n_length: torch.Tensor | None = None
    n_angle: torch.Tensor | None = None

    @property
    def past_key_values(self) -> Cache | None:
        return self.cache


class WyckoffGPTModel(PreTrainedModel):
    config_class = WyckoffGPTConfig
    base_model_prefix = "wyckoffgpt"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "wte.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: WyckoffGPTConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.value_embedding = ValueEmbedding(config)
        # Running composition (see wyckoffgpt.composition): fractions and log counts per element slot,
        # log total atoms, number of sites.
        self.composition_embedding = (
            nn.Linear(2 * config.composition_slots + 2, config.n_embd) if config.composition_slots else None
        )
        # Whether the atoms placed so far are charge-balanced: the last composition column.
        self.charge_embedding = nn.Linear(1, config.n_embd) if getattr(config, "charge_feature", False) else None
        # Element properties (config.element_properties) mapped into the token embedding space.
        properties = getattr(config, "element_properties", None)
        self.element_embedding = nn.Linear(len(properties[0]), config.n_embd, bias=False) if properties else None
        self._element_tables: dict[torch.device, torch.Tensor] = {}
        self.wpe = (
            nn.Embedding(config.max_position_embeddings, config.n_embd)
            if config.position_embedding == "learned"
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.value_head = ValueHead(config)
        self._kind_tables: dict[torch.device, torch.Tensor] = {}
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Every Linear, Embedding and LayerNorm gets transformers' default (normal(0, initializer_range),
        # zero bias, unit LayerNorm), with no GPT-2 shrinking of the residual projections: transformers
        # >= 5.20 never calls `_init_weights` on a remote-code module without parameters of its own
        # (attention, MLP), so that shrinking did not run in the default model's training, and on
        # earlier releases it did; one rule for every release keeps training reproducible.
        super()._init_weights(module)
        extra_inputs = ("composition_embedding", "charge_embedding", "element_embedding")
        if any(module is getattr(self, name, None) for name in extra_inputs):
            # Zero: a model given this input on top of trained weights starts out unchanged.
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _element_table(self, device: torch.device) -> torch.Tensor:
        """(vocab_size, properties): config.element_properties at their token ids, zero elsewhere."""
        table = self._element_tables.get(device)
        if table is None:
            # Like the kind table: derived from the config, never saved or loaded.
            table = torch.zeros(self.config.vocab_size, len(self.config.element_properties[0]))
            table[self.config.element_token_ids] = torch.tensor(self.config.element_properties)
            table = self._element_tables[device] = table.to(device)
        return table

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The token embedding: learned, plus the map of the element properties for element tokens."""
        x = self.wte(token_ids)
        if self.element_embedding is not None:
            x = x + self.element_embedding(self._element_table(token_ids.device)[token_ids].to(x.dtype))
        return x

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits against the same embeddings as `embed_tokens` (the output layer is tied)."""
        logits = self.lm_head(hidden)
        if self.element_embedding is not None:
            extra = self.element_embedding(self._element_table(hidden.device).to(hidden.dtype))
            logits = logits + F.linear(hidden, extra)
        return logits

    def token_kinds(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Value kind (NOT_VALUE, COORD, LENGTH, ANGLE) of each token id."""
        table = self._kind_tables.get(token_ids.device)
        if table is None:
            # A plain attribute, not a buffer: derived from the config, so it is never saved or loaded.
            table = torch.zeros(self.config.vocab_size, dtype=torch.long)
            table[list(self.config.coord_token_ids)] = COORD
            table[list(self.config.length_token_ids)] = LENGTH
            table[list(self.config.angle_token_ids)] = ANGLE
            table = table.to(token_ids.device)
            self._kind_tables[token_ids.device] = table
        return table[token_ids]

    # -- masks and positions ------------------------------------------------------------------------

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """(SDPA mask, is_causal). SDPA's own is_causal aligns top-left, which is only right when there
        is no cache, so cached multi-token steps and padded batches get an explicit boolean mask."""
        if attention_mask is None:
            if past_len == 0:
                return None, q_len > 1
            if q_len == 1:
                return None, False
        k_len = past_len + q_len
        q_pos = past_len + torch.arange(q_len, device=device)
        k_pos = torch.arange(k_len, device=device)
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # (q, k)
        if attention_mask is not None:
            mask = mask.unsqueeze(0) & attention_mask.bool()[:, None, :k_len]
            # A padding query would see no key at all (NaN softmax): let it see itself.
            mask = (mask | (k_pos.unsqueeze(0) == q_pos.unsqueeze(1))).unsqueeze(1)
        return mask, False

    def _position_ids(self, attention_mask: torch.Tensor | None, q_len: int, past_len: int, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.arange(past_len, past_len + q_len, device=device).unsqueeze(0)
        # Left padding: count positions from each row's first real token.
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[:, past_len : past_len + q_len]

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        compute_loss: bool = False,
        position_ids: torch.Tensor | None = None,
        composition: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> WyckoffGPTOutput:
        """`attention_mask` (B, past + T) marks real tokens with 1 (needed only for left padding or
        padding inside a cached prompt; right padding is harmless under causal attention).
        With `compute_loss`, targets are the next tokens and next values of `input_ids`/`input_values`;
        pad targets are ignored. `composition` (B, T, 2 * composition_slots + 2): the running
        composition after each token, required when `config.composition_slots` > 0. `cache` is the KV
        cache (a `transformers.Cache`); `past_key_values` is its name before transformers 5.24.
        No catch-all keywords: a misspelt or foreign one (e.g. `labels=`; the loss is `compute_loss`)
        is a TypeError naming it, not silently ignored. Nothing in transformers calls this with more:
        the model has no `generate`, and `from_pretrained` runs no forward pass."""
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
            cache = past_key_values
        b, t = input_ids.shape
        if input_values is None:
            input_values = torch.full((b, t), float("nan"), device=input_ids.device)
        if use_cache and cache is None:
            cache = DynamicCache()
        past_len = cache.get_seq_length() if cache is not None else 0

        kinds = self.token_kinds(input_ids)
        has_value = (kinds != NOT_VALUE) & torch.isfinite(input_values)
        values = torch.where(has_value, input_values.float(), torch.zeros_like(input_values, dtype=torch.float))
        x = self.embed_tokens(input_ids) + self.value_embedding(values, kinds) * has_value.unsqueeze(-1)
        if self.composition_embedding is not None:
            if composition is None:
                raise ValueError("this model reads the running composition: pass `composition` "
                                 "(wyckoffgpt.composition.sequence_features)")
            composition = composition.to(x.dtype)
            if self.charge_embedding is not None:
                x = x + self.charge_embedding(composition[..., -1:])
                composition = composition[..., :-1]
            x = x + self.composition_embedding(composition)
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, t, past_len, input_ids.device)
        if self.wpe is not None:
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(f"position {int(position_ids.max())} >= max_position_embeddings")
            x = x + self.wpe(position_ids)
        else:
            x = x + sinusoidal_positions(position_ids, self.config.n_embd).to(x.dtype)
        x = self.drop(x)

        attn_mask, is_causal = self._attention_mask(attention_mask, t, past_len, input_ids.device)
        for block in self.blocks:
            x = block(x, attn_mask, is_causal, cache)
        hidden = self.ln_f(x)
        logits = self.token_logits(hidden)

        losses = self._losses(input_ids, input_values, attention_mask, hidden, logits) if compute_loss else {}
        # Every field goes through the constructor: before transformers 5.2x a field set afterwards is
        # an attribute but not a key, and accelerate's fp32 conversion rebuilds outputs from their keys.
        return WyckoffGPTOutput(logits=logits, last_hidden_state=hidden, cache=cache if use_cache else None, **losses)

    def _losses(self, input_ids, input_values, attention_mask, hidden, logits) -> dict[str, torch.Tensor]:
        """The output's loss fields: `loss`, `loss_sum`, `token_loss_sum`, `n_tokens` and a sum and a
        count per value kind."""
        target_ids = input_ids[:, 1:]
        target_values = input_values[:, 1:].float()
        valid = target_ids != self.config.pad_token_id
        if attention_mask is not None:
            valid = valid & attention_mask[:, attention_mask.shape[1] - input_ids.shape[1] + 1 :].bool()
        ce = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), target_ids.reshape(-1), reduction="none"
        )
        token_sum = (ce * valid.reshape(-1)).sum()

        # The value head runs only where the next token carries a value.
        target_kinds = self.token_kinds(target_ids)
        rows = (valid & (target_kinds != NOT_VALUE) & torch.isfinite(target_values)).reshape(-1)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[rows]
        ids, vals, kinds = target_ids.reshape(-1)[rows], target_values.reshape(-1)[rows], target_kinds.reshape(-1)[rows]
        per_value = self._value_loss(h, ids, vals, kinds)

        losses = {"token_loss_sum": token_sum, "n_tokens": valid.sum(), "loss_sum": token_sum + per_value.sum()}
        for kind, name in KIND_NAMES.items():
            sel = kinds == kind
            losses[f"{name}_loss_sum"] = (per_value * sel).sum()
            losses[f"n_{name}"] = sel.sum()
        losses["loss"] = losses["loss_sum"] / losses["n_tokens"].clamp(min=1)
        return losses

    def _value_loss(self, hidden, next_ids, values, kinds) -> torch.Tensor:
        """Per-row NLL (mixture head) or squared error in the regressed variable (MSE head)."""
        if self.config.continuous_head == "mixture":
            return -self._log_prob(hidden, next_ids, values, kinds)
        raw = self.value_head.raw(hidden, self.embed_tokens(next_ids), kinds)
        y, _ = _to_modelled(values, kinds)
        return (self.value_head.point_estimate(raw, kinds) - y) ** 2

    def _log_prob(self, hidden, next_ids, values, kinds) -> torch.Tensor:
        raw = self.value_head.raw(hidden, self.embed_tokens(next_ids), kinds)
        log_w, mu, sigma = self.value_head.mixture_params(raw, kinds)
        y, log_jac = _to_modelled(values.float(), kinds)
        y = y.unsqueeze(-1)
        gauss = _normal_log_pdf(y, mu, sigma)
        # Wrapped normal on the unit circle: sum the normal density over periodic images.
        shifts = torch.arange(-WRAPS, WRAPS + 1, device=y.device, dtype=y.dtype)
        wrapped = torch.logsumexp(_normal_log_pdf((y + shifts).unsqueeze(-2), mu.unsqueeze(-1), sigma.unsqueeze(-1)), dim=-1)
        comp = torch.where(kinds.unsqueeze(-1) == COORD, wrapped, gauss)
        return torch.logsumexp(log_w + comp, dim=-1) + log_jac

    # -- API for samplers and evaluation -----------------------------------------------------------

    @torch.no_grad()
    def sample_values(
        self,
        hidden: torch.Tensor,
        next_token_ids: torch.Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw the value of each row's next token, in natural units: coordinates in [0, 1), lengths
        > 0 Å, angles in (0, 180)°; NaN where the next token is not a value token.

        `hidden` (B, d) is `last_hidden_state` at the current position. Temperature divides component
        logits and multiplies widths; temperature <= 0 returns the mean of the heaviest component.
        The MSE head has no distribution and returns its point estimate at any temperature."""
        kinds = self.token_kinds(next_token_ids)
        raw = self.value_head.raw(hidden, self.embed_tokens(next_token_ids), kinds)
        if self.config.continuous_head == "mse":
            y = self.value_head.point_estimate(raw, kinds)
        else:
            log_w, mu, sigma = self.value_head.mixture_params(raw, kinds)
            gen_device = generator.device if generator is not None else hidden.device
            if temperature <= 0:
                comp = log_w.argmax(dim=-1, keepdim=True)
                y = mu.gather(1, comp).squeeze(1)
            else:
                probs = torch.softmax(log_w / temperature, dim=-1).to(gen_device)
                comp = torch.multinomial(probs, 1, generator=generator).to(hidden.device)
                noise = torch.randn(comp.shape[0], generator=generator, device=gen_device).to(hidden.device)
                y = mu.gather(1, comp).squeeze(1) + temperature * sigma.gather(1, comp).squeeze(1) * noise
        values = _from_modelled(y, kinds)
        return torch.where(kinds != NOT_VALUE, values, torch.full_like(values, float("nan")))

    @torch.no_grad()
    def value_log_prob(self, hidden: torch.Tensor, next_token_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Log density (per natural unit: fractional coordinate, Å, degree) of `values` (B,) for each
        row's next token; NaN where it is not a value token. Only the mixture head has a density."""
        if self.config.continuous_head != "mixture":
            raise NotImplementedError("value_log_prob needs continuous_head='mixture'; the MSE head has no density")
        kinds = self.token_kinds(next_token_ids)
        logp = self._log_prob(hidden, next_token_ids, values, kinds)
        return torch.where(kinds != NOT_VALUE, logp, torch.full_like(logp, float("nan")))


WyckoffGPTConfig.register_for_auto_class()
WyckoffGPTModel.register_for_auto_class("AutoModel")
