"""Train a WyckoffGPT model on a tokenized dataset folder.

    python train.py --data DIR --out DIR [--model-preset small] [--config file.yaml] [--max-steps N]
                    [--epochs E] [--resume] [--mixed-precision bf16] ...
    python train.py --data DIR --out DIR --init-from bundled [--freeze-blocks K]   # fine-tuning

Several processes (one model, one DDP group):
    torchrun --nproc_per_node 2 train.py ...
    accelerate launch --multi_gpu --num_processes 2 train.py ...
Settings come from the YAML file (keys of wyckoffgpt.training.TrainConfig), then from the flags: one
flag per TrainConfig field, generated from the field and its documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import types
import typing
from typing import Any

from wyckoffgpt.training import TrainConfig, TrainingError, train, train_config_from_dict


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        print(f"train.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"dropout\": 0.1}}', got {text!r}")
    return value


def _flag_options(hint: Any) -> dict[str, Any]:
    """argparse options for a TrainConfig annotation: None is never typed on the command line (a flag
    left out keeps the YAML's or the field's value), a path is a string."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None) and a is not os.PathLike]
        (hint,) = args
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is tuple:
        (item, *_) = typing.get_args(hint)
        return {"type": item, "nargs": len(typing.get_args(hint))}
    if typing.get_origin(hint) is dict:
        return {"type": _json_object, "metavar": "JSON"}
    return {"type": hint}


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required, here or in --config"
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return "default: " + (" ".join(map(str, value)) if isinstance(value, tuple) else json.dumps(value)
                          if isinstance(value, dict) else str(value))


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of the dataclass `config_class` (--field-name, plus the field's own short
    flags), with its help text and default; a flag left out is None, so it overrides nothing."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        options = _flag_options(hints[f.name])
        if f.metadata.get("choices"):
            options["choices"] = f.metadata["choices"]
        help_text = f"{f.metadata.get('help', '')} ({_default_text(f)})".replace("%", "%%")
        parser.add_argument(f"--{f.name.replace('_', '-')}", *f.metadata.get("flags", ()), dest=f.name,
                            default=None, help=help_text, **options)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file with training settings (TrainConfig keys); flags override it")
    add_config_flags(p, TrainConfig)
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
    values.update({key: value for key, value in vars(args).items() if key != "config" and value is not None})
    for required, flag in (("data_dir", "--data"), ("out_dir", "--out")):
        if not values.get(required):
            raise ValueError(f"{flag} is required (or {required} in --config)")
    values.setdefault("command", "python " + shlex.join(sys.argv))
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from accelerate import PartialState

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
