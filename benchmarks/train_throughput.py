"""Training throughput and model FLOP utilisation of the `small` preset on this machine.

    python benchmarks/train_throughput.py [--preset small] [--batch-size N] [--seq-len 64] [--steps 10]

Times full training steps (forward with loss, backward, grad clipping, AdamW) in fp32 and under bf16
autocast, and the machine's matmul rate in the same run. MFU = 6 * params * tokens/s / matmul FLOP/s (median over rounds)
(the usual 6N FLOPs per token for forward + backward; attention scores are not counted).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from wyckoffgpt.composition import feature_size
from wyckoffgpt.configuration_wyckoffgpt import WyckoffGPTConfig
from wyckoffgpt.modeling_wyckoffgpt import WyckoffGPTModel
from wyckoffgpt.training import PRESET_TRAINING


def vocab_fields() -> dict:
    try:
        from wyckoffgpt.vocab import default_vocab

        return default_vocab().model_fields()
    except Exception:  # the benchmark only needs plausible sizes
        return dict(vocab_size=1300, coord_token_ids=[3, 4, 5], length_token_ids=[6, 7, 8], angle_token_ids=[9, 10, 11])


def matmul_gflops(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Rate of large square matmuls (best of two sizes)."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def synthetic_batch(fields: dict, batch: int, seq_len: int, gen: torch.Generator,
                    composition_width: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with value tokens at a realistic rate (~1 in 4) and values in range, and a
    random running-composition input when the model reads one (its width; 0: none)."""
    ids = torch.randint(12, fields["vocab_size"], (batch, seq_len), generator=gen)
    value_ids = torch.tensor(fields["coord_token_ids"] + fields["length_token_ids"] + fields["angle_token_ids"])
    is_value = torch.rand(batch, seq_len, generator=gen) < 0.25
    ids = torch.where(is_value, value_ids[torch.randint(len(value_ids), (batch, seq_len), generator=gen)], ids)
    ids[:, 0] = fields.get("bos_token_id", 1)
    values = torch.where(is_value, torch.rand(batch, seq_len, generator=gen) * 0.98 + 0.01, torch.nan)
    lengths = torch.isin(ids, torch.tensor(fields["length_token_ids"]))
    angles = torch.isin(ids, torch.tensor(fields["angle_token_ids"]))
    values = torch.where(lengths, 3 + 10 * values, torch.where(angles, 60 + 60 * values, values))
    out = {"input_ids": ids, "input_values": values}
    if composition_width:
        out["composition"] = torch.rand(batch, seq_len, composition_width, generator=gen)
    return out


class Trainer:
    """One training step as in wyckoffgpt.training: forward with loss, backward, clipping, fused AdamW."""

    def __init__(self, model, batch, bf16: bool) -> None:
        self.model, self.batch, self.bf16 = model, batch, bf16
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-3, fused=True)
        self.tokens_per_step = batch["input_ids"].numel()
        self.steps(2)  # warm-up: allocator, kernels, optimizer state

    def steps(self, n: int) -> float:
        """tokens/s over n steps."""
        start = time.perf_counter()
        for _ in range(n):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model(**self.batch, compute_loss=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return self.tokens_per_step * n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's training batch size")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="training steps per round")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()

    torch.manual_seed(0)
    fields = vocab_fields()
    batch_size = args.batch_size or PRESET_TRAINING[args.preset]["batch_size"]
    config = WyckoffGPTConfig.from_preset(args.preset, **fields)
    model = WyckoffGPTModel(config).train()
    params = model.num_parameters()
    width = feature_size(config.composition_slots, config.charge_feature) if config.composition_slots else 0
    batch = synthetic_batch(fields, batch_size, args.seq_len, torch.Generator().manual_seed(0), width)

    # A round measures the matmul rate right before and right after a few training steps, so each MFU
    # pairs numbers taken under the same conditions (other load on a shared machine moves both); the
    # medians over rounds are reported.
    trainers = {"fp32": Trainer(model, batch, bf16=False), "bf16": Trainer(model, batch, bf16=True)}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rounds: dict[str, list[tuple[float, float, float]]] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            before = matmul_gflops(dtypes[name], 0.4)
            tps = trainer.steps(args.steps)
            peak = (before + matmul_gflops(dtypes[name], 0.4)) / 2
            rounds[name].append((tps, peak, 6 * params * tps / (peak * 1e9)))
    med = {name: [statistics.median(col) for col in zip(*rows)] for name, rows in rounds.items()}
    (tps_fp32, gflops_fp32, mfu_fp32), (tps_bf16, gflops_bf16, mfu_bf16) = med["fp32"], med["bf16"]
    result = {
        "preset": args.preset,
        "params": params,
        "batch_size": batch_size,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "tokens_per_s_fp32": round(tps_fp32, 1),
        "tokens_per_s_bf16": round(tps_bf16, 1),
        "matmul_gflops_fp32": round(gflops_fp32, 1),
        "matmul_gflops_bf16": round(gflops_bf16, 1),
        "mfu_fp32": round(mfu_fp32, 3),
        "mfu_bf16": round(mfu_bf16, 3),
        "mfu_fp32_rounds": [round(r[2], 3) for r in rounds["fp32"]],
        "mfu_bf16_rounds": [round(r[2], 3) for r in rounds["bf16"]],
        "load_average_1min": os.getloadavg()[0],  # > cores means others shared the CPU
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
