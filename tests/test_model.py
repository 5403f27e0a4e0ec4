"""WyckoffGPT model: shapes, losses, KV cache, value head distributions, save/load and Hub loading."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic_data import ANGLES, COORDS, LENGTHS, PAD, VOCAB, make_sequences
from transformers import AutoConfig, AutoModel

import wyckoffgpt
from wyckoffgpt import WyckoffGPTConfig, WyckoffGPTModel
from wyckoffgpt.data import collate

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny(**overrides) -> WyckoffGPTModel:
    torch.manual_seed(0)
    return WyckoffGPTModel(WyckoffGPTConfig.from_preset("tiny", **VOCAB, **overrides)).eval()


def batch_of(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    seqs = make_sequences(n, seed)
    return collate([(torch.from_numpy(i), torch.from_numpy(v)) for i, v in seqs], PAD)


def test_presets_sizes_and_unknown_preset():
    sizes = {name: WyckoffGPTModel(WyckoffGPTConfig.from_preset(name, **VOCAB)).num_parameters() for name in ("tiny", "small")}
    assert sizes["tiny"] < 500_000
    assert 1_000_000 < sizes["small"] < 10_000_000
    paper = WyckoffGPTConfig.from_preset("paper", **VOCAB)
    assert (paper.n_layer, paper.n_embd, paper.n_head) == (12, 512, 16)
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny, small, paper"):
        WyckoffGPTConfig.from_preset("huge", **VOCAB)


def test_forward_shapes_and_loss_parts():
    model = tiny()
    batch = batch_of(4)
    out = model(**batch, compute_loss=True)
    b, t = batch["input_ids"].shape
    assert out.logits.shape == (b, t, VOCAB["vocab_size"])
    assert out.last_hidden_state.shape == (b, t, model.config.n_embd)
    # Counts: every non-pad next token is a target; value counts follow the target token kinds.
    targets = batch["input_ids"][:, 1:]
    assert out.n_tokens == (targets != PAD).sum()
    assert out.n_coord == torch.isin(targets, torch.tensor(COORDS)).sum()
    assert out.n_length == torch.isin(targets, torch.tensor(LENGTHS)).sum() == 3 * b
    parts = out.token_loss_sum + out.coord_loss_sum + out.length_loss_sum + out.angle_loss_sum
    torch.testing.assert_close(out.loss_sum, parts)
    torch.testing.assert_close(out.loss, out.loss_sum / out.n_tokens)
    # Initial cross-entropy is close to uniform over the vocabulary.
    assert abs(float(out.token_loss_sum.detach() / out.n_tokens) - math.log(VOCAB["vocab_size"])) < 0.3


def test_padding_does_not_change_loss_sums():
    model = tiny()
    batch = batch_of(3)
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.full((3, 5), PAD)], dim=1),
        "input_values": torch.cat([batch["input_values"], torch.full((3, 5), float("nan"))], dim=1),
    }
    a, b = model(**batch, compute_loss=True), model(**padded, compute_loss=True)
    torch.testing.assert_close(a.loss_sum, b.loss_sum)
    assert a.n_tokens == b.n_tokens


def test_tiny_model_overfits_32_sequences():
    """Threshold: after 300 full-batch AdamW steps the total loss per token is < 1.0 (from ~5.8) and the
    token cross-entropy < 0.6 nats (from ln 64 = 4.16)."""
    model = tiny().train()
    batch = batch_of(32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only lose to thread synchronisation, badly on a busy CPU
    try:
        for _ in range(300):
            out = model(**batch, compute_loss=True)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        out = model(**batch, compute_loss=True)
    assert float(out.loss) < 1.0
    assert float(out.token_loss_sum / out.n_tokens) < 0.6


@pytest.mark.parametrize("position_embedding", ["sinusoidal", "learned"])
def test_cached_forward_matches_uncached(position_embedding):
    model = tiny(position_embedding=position_embedding)
    batch = batch_of(2, seed=3)
    ids, vals = batch["input_ids"], batch["input_values"]
    full = model(ids, vals)
    # Prompt of 5 tokens in one call, then one token at a time.
    out = model(ids[:, :5], vals[:, :5], use_cache=True)
    logits, hidden = [out.logits], [out.last_hidden_state]
    cache = out.cache
    for t in range(5, ids.shape[1]):
        out = model(ids[:, t : t + 1], vals[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
        hidden.append(out.last_hidden_state)
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(hidden, 1), full.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_sampler_kv_cache_matches_dynamic_cache_through_steps_and_row_selection():
    # The sampler's KVCache (reused buffers, no allocation per step) stands in for DynamicCache:
    # the same logits through a prompt, single-token steps and finished rows leaving the batch.
    from transformers.cache_utils import DynamicCache

    from wyckoffgpt.sampling import KVCache

    model = tiny()
    batch = batch_of(4, seed=5)
    ids, vals = batch["input_ids"], batch["input_values"]
    results = []
    for cache in (DynamicCache(), KVCache()):
        with torch.no_grad():  # KVCache is for sampling: no gradients
            rows = torch.arange(4)
            logits = [model(ids[:, :4], vals[:, :4], cache=cache, use_cache=True).logits]
            for t in range(4, ids.shape[1]):
                if t in (6, 9):  # a row finishes: the others go on
                    keep = torch.arange(1, len(rows))
                    rows = rows[keep]
                    cache.batch_select_indices(keep)
                logits.append(model(ids[rows, t : t + 1], vals[rows, t : t + 1], cache=cache, use_cache=True).logits)
            assert cache.get_seq_length() == ids.shape[1]
            results.append(logits)
    for dynamic, reused in zip(*results):
        torch.testing.assert_close(reused, dynamic, atol=1e-6, rtol=1e-6)


def test_forward_refuses_an_unknown_keyword_and_keeps_the_cache_alias():
    # A misspelt keyword used to vanish into **kwargs: `labels=` would give no loss and no error.
    model = tiny()
    batch = batch_of(2, seed=4)
    with pytest.raises(TypeError, match="labels"):
        model(**batch, labels=batch["input_ids"])
    out = model(batch["input_ids"][:, :3], batch["input_values"][:, :3], use_cache=True)
    new, cached = batch["input_ids"][:, 3:4], batch["input_values"][:, 3:4]
    via_alias = model(new, cached, past_key_values=out.cache, use_cache=True)
    assert via_alias.cache.get_seq_length() == 4


def test_left_padded_batch_matches_single_sequences():
    model = tiny()
    seqs = [torch.from_numpy(s) for s in (make_sequences(2, 5)[0][0], make_sequences(2, 5)[1][0])]
    vals = [torch.from_numpy(v) for v in (make_sequences(2, 5)[0][1], make_sequences(2, 5)[1][1])]
    t = max(len(s) for s in seqs)
    ids = torch.full((2, t), PAD)
    values = torch.full((2, t), float("nan"))
    mask = torch.zeros(2, t, dtype=torch.long)
    for r, (s, v) in enumerate(zip(seqs, vals)):
        ids[r, t - len(s) :], values[r, t - len(s) :], mask[r, t - len(s) :] = s, v, 1
    batched = model(ids, values, attention_mask=mask)
    for r, (s, v) in enumerate(zip(seqs, vals)):
        alone = model(s[None], v[None])
        torch.testing.assert_close(batched.logits[r, -1], alone.logits[0, -1], atol=1e-5, rtol=1e-5)


def _sharp_model() -> WyckoffGPTModel:
    """Value head pushed to put its mass right at the edges of each range, the hardest case."""
    model = tiny()
    with torch.no_grad():
        k = model.config.n_mixture
        bias = model.value_head.out.bias.view(3, 3 * k)
        bias[0, k : 2 * k] = 0.9999  # coordinate means just below 1 (wrapped)
        bias[0, 2 * k :] = -20.0  # tiny coordinate widths
        bias[2, k : 2 * k] = 15.0  # angle logits near 180°
    return model


def test_sampled_values_stay_in_range():
    model = _sharp_model()
    n = 4000
    hidden = torch.randn(n, model.config.n_embd)
    next_ids = torch.tensor([COORDS[0], LENGTHS[1], ANGLES[2], 30] * (n // 4))
    gen = torch.Generator().manual_seed(0)
    for temperature in (0.0, 0.5, 1.0, 3.0):
        v = model.sample_values(hidden, next_ids, temperature, gen)
        coords, lengths, angles, other = v[0::4], v[1::4], v[2::4], v[3::4]
        assert ((coords >= 0) & (coords < 1)).all()
        assert (lengths > 0).all() and torch.isfinite(lengths).all()
        assert ((angles > 0) & (angles < 180)).all()
        assert torch.isnan(other).all()
    # Float edge: a remainder that rounds up to 1.0 must come back as 0.
    from wyckoffgpt.modeling_wyckoffgpt import _wrap_unit

    edge = _wrap_unit(torch.tensor([-1e-9, -1e-30, 1.0, 2.5, -0.25]))
    assert ((edge >= 0) & (edge < 1)).all()


def test_sampling_is_seeded_and_temperature_scales_width():
    model = tiny(n_mixture=1)  # one component: the spread of log(length) is exactly sigma * T
    hidden = torch.randn(1, model.config.n_embd).expand(3000, -1)
    ids = torch.full((3000,), LENGTHS[0])
    a = model.sample_values(hidden, ids, 1.0, torch.Generator().manual_seed(1))
    b = model.sample_values(hidden, ids, 1.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    cold = model.sample_values(hidden, ids, 0.2, torch.Generator().manual_seed(1))
    ratio = float(torch.log(cold).std() / torch.log(a).std())
    assert 0.17 < ratio < 0.23


@pytest.mark.parametrize(
    "token, lo, hi",
    [(COORDS[0], 0.0, 1.0), (LENGTHS[0], 1e-3, 400.0), (ANGLES[0], 1e-4, 180.0 - 1e-4)],
)
def test_value_densities_integrate_to_one(token, lo, hi):
    model = tiny()
    grid = torch.linspace(lo, hi, 200_001, dtype=torch.float64)[:-1].float()
    hidden = torch.randn(1, model.config.n_embd).expand(len(grid), -1)
    ids = torch.full((len(grid),), token)
    density = model.value_log_prob(hidden, ids, grid).exp().double()
    integral = float(torch.trapezoid(density, grid.double()))
    assert abs(integral - 1.0) < 1e-2


def test_mse_head_ablation():
    model = tiny(continuous_head="mse")
    out = model(**batch_of(4), compute_loss=True)
    assert torch.isfinite(out.loss) and out.coord_loss_sum >= 0
    hidden = torch.randn(8, model.config.n_embd)
    ids = torch.tensor(COORDS + LENGTHS + ANGLES[:2])
    a = model.sample_values(hidden, ids, 1.0, torch.Generator().manual_seed(0))
    b = model.sample_values(hidden, ids, 1.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)  # a point estimate: no randomness
    assert ((a[:3] >= 0) & (a[:3] < 1)).all()
    with pytest.raises(NotImplementedError):
        model.value_log_prob(hidden, ids, a)


def test_bf16_autocast_forward_on_cpu():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch_of(4), compute_loss=True)
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_save_load_identical_and_safetensors_only(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in names
    assert {"configuration_wyckoffgpt.py", "modeling_wyckoffgpt.py"} <= names  # copied for remote code
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"].endswith("WyckoffGPTModel")

    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is WyckoffGPTModel
    assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()  # still tied
    batch = batch_of(3)
    a, b = model(**batch), loaded(**batch)
    assert torch.equal(a.logits, b.logits)
    h = a.last_hidden_state[:, -1]
    ids = torch.tensor([COORDS[1], LENGTHS[0], ANGLES[1]])
    sa = model.sample_values(h, ids, 1.0, torch.Generator().manual_seed(7))
    sb = loaded.sample_values(h, ids, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(sa, sb)
    assert torch.equal(model.value_log_prob(h, ids, sa), loaded.value_log_prob(h, ids, sa))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), WyckoffGPTConfig)


def test_element_properties_start_at_zero_move_only_element_tokens_and_load_back(tmp_path):
    elements = list(range(20, 30))  # the synthetic vocabulary's element tokens
    properties = [[float(i), 1.0 - i / 5, (-1.0) ** i] for i in range(len(elements))]
    base = tiny()
    model = tiny(element_token_ids=elements, element_properties=properties)
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing == ["element_embedding.weight"]
    batch = batch_of(3)
    # A new element input starts at zero: over trained weights, the model starts out unchanged, also
    # when it is loaded over a saved model (train.py --init-from M --element-features).
    assert torch.equal(model(**batch).logits, base(**batch).logits)
    base.save_pretrained(tmp_path / "base")
    grown = WyckoffGPTModel.from_pretrained(tmp_path / "base", config=model.config).eval()
    assert not grown.element_embedding.weight.any()
    assert torch.equal(grown(**batch).logits, base(**batch).logits)
    with torch.no_grad():
        model.element_embedding.weight.normal_()
    every = torch.arange(VOCAB["vocab_size"])
    moved = (model.embed_tokens(every) != base.wte(every)).any(-1)
    assert moved.nonzero().flatten().tolist() == elements
    # The output layer shares the embedding: only the element tokens' logits move.
    h = torch.randn(2, model.config.n_embd)
    assert ((model.token_logits(h) != base.token_logits(h)).any(0).nonzero().flatten().tolist()) == elements
    model.save_pretrained(tmp_path / "trained")
    loaded = AutoModel.from_pretrained(tmp_path / "trained").eval()
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)


LOAD_SCRIPT = """
import sys, torch
from transformers import AutoModel
mode, target = sys.argv[1], sys.argv[2]
if mode == "package":
    import wyckoffgpt  # registers the classes
    model = AutoModel.from_pretrained(target)
else:
    assert "wyckoffgpt" not in sys.modules
    model = AutoModel.from_pretrained(target, trust_remote_code=True)
ids = torch.tensor([[1, 3, 21, 41, 51, 10, 13]])
vals = torch.tensor([[float("nan")] * 5 + [0.5, 4.0]])
print(type(model).__name__, float(model(ids, vals).logits.sum()))
"""


def _run_loader(mode: str, target: str, env_extra: dict[str, str], cwd: Path) -> str:
    env = {**os.environ, **env_extra}
    if mode == "package":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    else:  # plain transformers: the package must not be importable
        env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, mode, target], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_load_by_repo_id_from_offline_hub_cache_and_remote_code(tmp_path):
    model = tiny()
    ids = torch.tensor([[1, 3, 21, 41, 51, 10, 13]])
    vals = torch.tensor([[float("nan")] * 5 + [0.5, 4.0]])
    with torch.no_grad():
        expected = float(model(ids, vals).logits.sum())
    # Lay out a Hub cache as huggingface_hub writes it: snapshots/<commit>/ plus refs/main.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--crystals--wyckoffgpt-tiny"
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for mode in ("package", "remote_code"):
        name, value = _run_loader(mode, "crystals/wyckoffgpt-tiny", env, cwd=tmp_path).split()
        assert name == "WyckoffGPTModel"
        assert abs(float(value) - expected) < 1e-3 * max(1.0, abs(expected))


def test_reimport_registration_is_idempotent():
    import importlib

    importlib.reload(wyckoffgpt)
    assert AutoConfig.for_model("wyckoffgpt").__class__.__name__ == "WyckoffGPTConfig"
