"""Configuration of the WyckoffGPT model.

Kept free of package imports (only transformers) so that `save_pretrained` can copy this file next to
the weights and plain transformers can load it with `trust_remote_code=True`.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

# Architecture presets. Vocabulary fields are not part of a preset: they come from the dataset.
# `small` is sized for CPU training: d=256 keeps every matmul big enough to run near the CPU's
# peak rate while a step stays short.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, n_mixture=4, value_basis_size=16, max_position_embeddings=128),
    # The bundled model's shape. Dropout is what lets it train for many epochs without over-fitting
    # (its model card compares the runs with and without it).
    "small": dict(n_layer=6, n_head=8, n_embd=256, n_mixture=8, value_basis_size=64, max_position_embeddings=256,
                  dropout=0.1, composition_slots=8),
    "paper": dict(n_layer=12, n_head=16, n_embd=512, n_mixture=8, value_basis_size=128, max_position_embeddings=256),
}

CONTINUOUS_HEADS = ("mixture", "mse")
POSITION_EMBEDDINGS = ("sinusoidal", "learned")


class WyckoffGPTConfig(PreTrainedConfig):
    """Hyper-parameters of a WyckoffGPT model plus the vocabulary facts the model depends on.

    Value tokens come in three kinds, told apart by token id: fractional coordinates (`coord_token_ids`,
    values in [0, 1), periodic), lattice lengths (`length_token_ids`, Å, > 0) and lattice angles
    (`angle_token_ids`, degrees, in (0, 180)). `vocab_hash` identifies the vocabulary so that a dataset
    built with another vocabulary is refused instead of silently mis-read.

    Args:
        vocab_size (`int`, defaults to 64): number of tokens; set from the vocabulary (the dataset's
            `meta.json` or `Vocab.model_fields()`), like the next seven arguments.
        pad_token_id, bos_token_id, eos_token_id (`int`, defaults to 0, 1, 2): ids of `<pad>`, `<bos>`, `<eos>`.
        coord_token_ids (`list[int]`, defaults to none): ids of the tokens that carry a fractional
            coordinate (`x=`, `y=`, `z=`), a value in [0, 1) on the circle.
        length_token_ids (`list[int]`, defaults to none): ids of the lattice-length tokens (`a=`, `b=`,
            `c=`), values in Å.
        angle_token_ids (`list[int]`, defaults to none): ids of the lattice-angle tokens, values in degrees.
        vocab_hash (`str`, defaults to ""): identity of the vocabulary the model was trained on.
        n_layer (`int`, defaults to 2): transformer blocks.
        n_head (`int`, defaults to 4): attention heads per block; must divide `n_embd`.
        n_embd (`int`, defaults to 64): width of the residual stream.
        mlp_ratio (`int`, defaults to 4): hidden width of each block's MLP, as a multiple of `n_embd`.
        dropout (`float`, defaults to 0.0): dropout probability on embeddings, attention and MLP outputs.
        max_position_embeddings (`int`, defaults to 128): longest sequence, in tokens (a hard limit only
            for learned positions).
        position_embedding (`str`, defaults to "sinusoidal"): "sinusoidal" (fixed) or "learned".
        continuous_head (`str`, defaults to "mixture"): "mixture" (a mixture density per value: wrapped
            normals for coordinates, normals of log(Å) for lengths and of logit(angle / 180°) for angles)
            or "mse" (a point estimate, no sampling temperature).
        n_mixture (`int`, defaults to 4): components of each value mixture.
        value_basis_size (`int`, defaults to 16): Gaussian basis functions per scale in the value input
            embedding (Matra-Genoa paper, IV.B): as many centres on a linear scale over [0, 1] as on
            |log v| over [0, `value_log_max`].
        value_basis_sigma_lin (`float`, defaults to the centre spacing 1 / (value_basis_size - 1)):
            width of the linear-scale basis functions, in units of the scaled value.
        value_basis_sigma_log (`float`, defaults to the centre spacing value_log_max / (value_basis_size - 1)):
            width of the log-scale basis functions, in units of log v.
        value_log_max (`float`, defaults to 6.0): upper end of the log-scale centres.
        length_scale (`float`, defaults to 30.0): Å; lengths are divided by it before the linear basis.
        initializer_range (`float`, defaults to 0.02): standard deviation of the initial weights.
        composition_slots (`int`, defaults to 0): > 0: the model also reads the running composition
            (atoms placed so far per element, `wyckoffgpt.composition`) for this many element slots, as
            the `composition` input; 0: tokens and values only (the paper's inputs).
        charge_feature (`bool`, defaults to False): with `composition_slots`, also whether the atoms
            placed so far pass SMACT charge balance.
        element_token_ids (`list[int]`, defaults to none): the element tokens that `element_properties`
            describes, one id per row.
        element_properties (`list[list[float]]`, defaults to none): per element token, fixed properties
            (`wyckoffgpt.chemistry.ELEMENT_PROPERTIES`, standardised, no unit); a learned linear map of
            them is added to the token's embedding, at the input and in the output layer, so that elements
            with similar chemistry share part of their representation. Stored here, not computed at
            load time, so a saved model never changes with pymatgen's data. None: learned embeddings only.
        tie_word_embeddings (`bool`, defaults to True): the output layer shares the token embedding.
    """

    model_type = "wyckoffgpt"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
    }

    def __init__(
        self,
        vocab_size: int = 64,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        coord_token_ids: list[int] | None = None,
        length_token_ids: list[int] | None = None,
        angle_token_ids: list[int] | None = None,
        vocab_hash: str = "",
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        max_position_embeddings: int = 128,
        position_embedding: str = "sinusoidal",
        continuous_head: str = "mixture",
        n_mixture: int = 4,
        value_basis_size: int = 16,
        value_basis_sigma_lin: float | None = None,
        value_basis_sigma_log: float | None = None,
        value_log_max: float = 6.0,
        length_scale: float = 30.0,
        initializer_range: float = 0.02,
        composition_slots: int = 0,
        charge_feature: bool = False,
        element_token_ids: list[int] | None = None,
        element_properties: list[list[float]] | None = None,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        if continuous_head not in CONTINUOUS_HEADS:
            raise ValueError(f"continuous_head must be one of {CONTINUOUS_HEADS}, got {continuous_head!r}")
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {position_embedding!r}")
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.vocab_size = vocab_size
        self.coord_token_ids = list(coord_token_ids or [])
        self.length_token_ids = list(length_token_ids or [])
        self.angle_token_ids = list(angle_token_ids or [])
        self.vocab_hash = vocab_hash
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding = position_embedding
        self.continuous_head = continuous_head
        self.n_mixture = n_mixture
        # Gaussian value basis (paper IV.B): `value_basis_size` centres on a linear scale over [0, 1]
        # (values first divided by a per-kind scale) and as many on |log v| over [0, value_log_max].
        # Default widths equal the centre spacing so neighbouring bumps overlap.
        self.value_basis_size = value_basis_size
        self.value_basis_sigma_lin = value_basis_sigma_lin or 1.0 / max(value_basis_size - 1, 1)
        self.value_basis_sigma_log = value_basis_sigma_log or value_log_max / max(value_basis_size - 1, 1)
        self.value_log_max = value_log_max
        self.length_scale = length_scale
        self.initializer_range = initializer_range
        # > 0: the model also reads the running composition (wyckoffgpt.composition) for this many
        # element slots, as the `composition` input; 0: tokens and values only (the paper's inputs).
        if composition_slots < 0:
            raise ValueError(f"composition_slots must be >= 0, got {composition_slots}")
        self.composition_slots = composition_slots
        # True: with the composition, also whether the atoms placed so far pass SMACT charge balance
        # (wyckoffgpt.composition), so the model can see when a site list may end chemically sound.
        if charge_feature and not composition_slots:
            raise ValueError("charge_feature needs composition_slots > 0")
        self.charge_feature = bool(charge_feature)
        self.element_token_ids = list(element_token_ids or [])
        self.element_properties = [list(map(float, row)) for row in element_properties or []]
        if len(self.element_token_ids) != len(self.element_properties):
            raise ValueError(f"element_properties has {len(self.element_properties)} rows for "
                             f"{len(self.element_token_ids)} element_token_ids")
        if len({len(row) for row in self.element_properties}) > 1:
            raise ValueError("element_properties rows must all have the same length")
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def from_preset(cls, name: str, **fields: Any) -> WyckoffGPTConfig:
        """Config of a named architecture preset; `fields` (vocabulary facts, overrides) win over it."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **fields})
