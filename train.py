"""Train a WyckoffGPT model on a tokenized dataset folder.

    python train.py --data DIR --out DIR [--model-preset small] [--config file.yaml] [--max-steps N]
                    [--epochs E] [--resume] [--mixed-precision bf16] ...
    python train.py --data DIR --out DIR --init-from bundled [--freeze-blocks K]   # fine-tuning

Several processes (one model, one DDP group):
    torchrun --nproc_per_node 2 train.py ...
    accelerate launch --multi_gpu --num_processes 2 train.py ...
Settings come from the YAML file (keys of wyckoffgpt.training.TrainConfig), then from the flags.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        print(f"train.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="tokenized dataset folder (meta.json + arrays)")
    p.add_argument("--out", help="output folder for checkpoints, logs and the final model")
    p.add_argument("--config", help="YAML file with training settings (TrainConfig keys)")
    p.add_argument("--model-preset", dest="model_preset", help="tiny | small | paper")
    p.add_argument("--init-from", dest="init_from", metavar="MODEL",
                   help="fine-tune: start from a saved model folder, a Hub repo id or 'bundled' (the packaged "
                        "model); unset settings then take the fine-tuning defaults (TrainConfig)")
    p.add_argument("--freeze-blocks", dest="freeze_blocks", type=int, metavar="K",
                   help="with --init-from: freeze the input embeddings and the first K transformer blocks")
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="sequences per micro-batch and process")
    p.add_argument("--grad-accum", dest="grad_accum_steps", type=int)
    p.add_argument("--lr", dest="max_lr", type=float, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--mixed-precision", dest="mixed_precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--length-sorted-pieces", dest="length_sorted_pieces", type=int,
                   help="run each micro-batch as this many pieces of similar length (same gradient, less "
                        "padding); default 4 on CPU, 1 on GPU")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--save-every", dest="save_every", type=int)
    p.add_argument("--log-every", dest="log_every", type=int)
    p.add_argument("--stop-at-step", dest="stop_at_step", type=int, help="stop with a checkpoint after this step")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in --out")
    p.add_argument("--keep-checkpoints", dest="keep_checkpoints", action="store_true", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        try:
            with open(args.config) as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read config file {args.config}: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {args.config} must hold a mapping of settings")
        values.update(loaded)
    renames = {"data": "data_dir", "out": "out_dir"}
    for key, value in vars(args).items():
        if key != "config" and value is not None:
            values[renames.get(key, key)] = value
    for required, flag in (("data_dir", "--data"), ("out_dir", "--out")):
        if not values.get(required):
            raise ValueError(f"{flag} is required (or {required} in --config)")
    values["command"] = "python " + shlex.join(sys.argv)
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Import after argument parsing so --help stays fast.
    import torch
    from accelerate import PartialState

    from wyckoffgpt.training import TrainingError, train, train_config_from_dict

    # Joining the process group here (the Accelerator created by train() reuses it) reports the real
    # world size, not what the launcher asked for. cpu=True on GPU-less machines: see training.py.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        print(f"processes: {state.num_processes}", flush=True)
    try:
        cfg = train_config_from_dict(settings(args))
        summary = train(cfg)
    except (TrainingError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    if summary.get("exported") and state.is_main_process:
        print(f"done: {summary['step']} steps, stop reason: {summary['stop_reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
