"""Sampling throughput. The last line printed is one JSON object:

    valid_per_min                  structures written per minute by generate.py end to end (sampling,
                                   decoding, filters, files), with --model or the bundled model; null
                                   when neither exists
    paper_tokens_per_s             sampler tokens/s, `paper` preset with random weights, batch 64,
                                   40 new tokens per sequence, KV cache
    paper_tokens_per_s_recompute   the same with the whole prefix recomputed at every step

    python benchmarks/sampling.py [--model DIR] [-n 2000] [--threads 1] [--skip-paper]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def valid_per_min(model: str | None, n: int, batch_size: int, temperature: float, device: str | None) -> dict:
    from wyckoffgpt.generation import InputError, resolve_model_path

    try:
        resolve_model_path(model)
    except InputError as e:
        return {"valid_per_min": None, "valid_note": str(e)}
    spec = importlib.util.spec_from_file_location("generate_cli", REPO / "generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["-n", str(n), "--batch-size", str(batch_size), "--temperature", str(temperature), "--seed", "0",
                "--out", tmp]
        argv += ["--model", model] if model else []
        argv += ["--device", device] if device else []
        t0 = time.perf_counter()
        code = cli.main(argv)
        elapsed = time.perf_counter() - t0
        written = len(list(Path(tmp).rglob("*.cif")))
    if code != 0:
        raise SystemExit(f"generate.py failed with status {code}")
    return {"valid_per_min": round(written / elapsed * 60, 1), "samples_per_min": round(n / elapsed * 60, 1),
            "valid_written": written, "valid_sampled": n, "valid_seconds": round(elapsed, 2)}


def paper_tokens_per_s(batch: int, new_tokens: int, device: str) -> dict:
    from wyckoffgpt import WyckoffGPTConfig, WyckoffGPTModel
    from wyckoffgpt.sampling import Sampler
    from wyckoffgpt.vocab import default_vocab

    vocab = default_vocab()
    torch.manual_seed(0)
    model = WyckoffGPTModel(WyckoffGPTConfig.from_preset("paper", **vocab.model_fields())).to(device).eval()
    ids = vocab.token_to_id
    prompt = [ids[t] for t in ("<bos>", "ehull:low", "n:3", "Al", "Ca", "Cu", "sg:225")]
    out = {"paper_params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    for use_cache, key in ((True, "paper_tokens_per_s"), (False, "paper_tokens_per_s_recompute")):
        sampler = Sampler(model, use_cache=use_cache)
        sampler.sample(None, batch_size=batch, prompt=prompt, max_new_tokens=2,
                       generator=torch.Generator(device=device).manual_seed(0))  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = sampler.sample(None, batch_size=batch, prompt=prompt, max_new_tokens=new_tokens,
                             generator=torch.Generator(device=device).manual_seed(1))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[key] = round(res.n_new_tokens / (time.perf_counter() - t0), 1)
    out["paper_speedup"] = round(out["paper_tokens_per_s"] / out["paper_tokens_per_s_recompute"], 1)
    return out


def main() -> None:
    from wyckoffgpt.sampling import SamplingConfig

    default = SamplingConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder or Hub repo id (default: the bundled model)")
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=default.batch_size)
    p.add_argument("--temperature", type=float, default=default.temperature)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--paper-batch", type=int, default=64)
    p.add_argument("--paper-new-tokens", type=int, default=40)
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--skip-valid", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as "
                   "CrystalGenerator samples on CPU; 0: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu": platform.processor()}
    if not args.skip_valid:
        result.update(valid_per_min(args.model, args.n, args.batch_size, args.temperature, args.device))
    if not args.skip_paper:
        result.update(paper_tokens_per_s(args.paper_batch, args.paper_new_tokens, args.device))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
