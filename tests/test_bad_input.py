"""Every command line, every kind of bad value: one line on stderr, exit status 2, nothing written.

One table for generate.py, train.py and data_prep/prepare.py. Each case runs the CLI's `main` in this
process (fast); `{out}` is a fresh output path that must not exist afterwards, `{results}` a folder
holding an earlier run's files that must be left exactly as it was, `{file}` a plain file."""
from __future__ import annotations

from pathlib import Path

import pytest
from random_model import save_random_model
from scripts import load_script
from synthetic_data import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SLICE = REPO / "tests" / "data" / "mp_slice.csv.gz"


CLIS = {"generate": REPO / "generate.py", "train": REPO / "train.py", "prepare": REPO / "data_prep" / "prepare.py"}

G, T, P = "generate", "train", "prepare"
CASES = [
    # generate.py: sampling settings
    (G, ["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (G, ["--top-p", "0"], "top_p must be in (0, 1]"),
    (G, ["--guidance", "-2"], "guidance must be a finite number >= 0"),
    (G, ["--elements", "Al", "Al"], "element Al is given twice"),
    (G, ["--elements", "Al", "Xx"], "unknown element"),
    (G, ["--elements", "Og"], "not in the model's vocabulary"),
    (G, ["--elements", "H", "Li", "Be", "B", "C", "N", "O", "F", "--spacegroup", "228"], "cannot hold 8 elements"),
    (G, ["--spacegroup", "0"], "1-230"),
    (G, ["--spacegroup", "231"], "1-230"),
    (G, ["--spacegroup", "cubic"], "invalid int value"),
    (G, ["--ehull", "medium"], "invalid choice"),
    (G, ["-n", "0"], "number of samples must be a positive integer"),
    (G, ["-n", "-3"], "number of samples must be a positive integer"),
    (G, ["-n", "many"], "invalid int value"),
    (G, ["--temperature", "0"], "temperature must be a finite number > 0"),
    (G, ["--temperature", "-1"], "temperature must be a finite number > 0"),
    (G, ["--temperature", "inf"], "temperature must be a finite number > 0"),
    (G, ["--temperatures", "0.7", "0"], "temperature must be a finite number > 0"),
    (G, ["--batch-size", "0"], "batch size must be a positive integer"),
    (G, ["--min-distance", "-0.1"], "minimum distance"),
    (G, ["--max-retries", "-1"], "max_retries must be a non-negative integer"),
    (G, ["--seed", "-1"], "seed must be an integer in [0, 2**63)"),
    (G, ["--seed", str(2**64)], "seed must be an integer in [0, 2**63)"),
    (G, ["--charge-check", "strict"], "invalid choice"),
    (G, ["--format", "xyz"], "invalid choice"),
    (G, ["--device", "gpu0"], "is not a device name"),
    (G, ["--report", "{out}.csv"], "belong to a sweep"),
    (G, ["--unknown-flag"], "unrecognized arguments"),
    # generate.py: exact formula, prototype and prompt conditioning
    (G, ["--formula", "Ca2AlCu2x"], "not a chemical formula"),
    (G, ["--formula", "Qq2O3"], "unknown element"),
    (G, ["--formula", "Ca2AlCu2", "--max-atoms", "4"], "does not fit"),
    (G, ["--formula", "NaCl", "--formula-units", "1,x"], "formula units"),
    (G, ["--max-atoms", "0"], "--max-atoms must be positive"),
    (G, ["--wyckoff", "225 Na 4a"], "Wyckoff spec"),
    (G, ["--prompt", "<bos> ehull:low n:2 Cl Na"], "prompt is not a valid sequence prefix"),
    # generate.py: stability screening
    (G, ["--relax", "--fmax", "0"], "--fmax must be > 0"),
    (G, ["--relax", "--relax-steps", "0"], "--relax-steps must be >= 1"),
    (G, ["--relax", "--temperatures", "0.7", "1.0"], "--relax is for a single run"),
    # generate.py: model and output
    (G, ["--model", "{out}-no-such-model"], "does not exist"),
    (G, ["--out", "{results}"], "already holds files"),
    (G, ["--out", "{file}/out"], "cannot write to --out"),
    (G, ["--out", "{file}"], "is a file, not a folder"),
    # train.py
    (T, ["--epochs", "0"], "epochs must be >= 1"),
    (T, ["--epochs", "ten"], "invalid int value"),
    (T, ["--max-steps", "0"], "max_steps must be >= 1"),
    (T, ["--batch-size", "0"], "batch_size must be >= 1"),
    (T, ["--grad-accum", "0"], "grad_accum_steps must be >= 1"),
    (T, ["--lr", "0"], "max_lr must be > 0"),
    (T, ["--lr", "nan"], "max_lr must be"),
    (T, ["--length-sorted-pieces", "0"], "length_sorted_pieces must be >= 1"),
    (T, ["--seed", "-1"], "seed must be >= 0"),
    (T, ["--eval-every", "-1"], "eval_every must be >= 0"),
    (T, ["--patience", "0"], "patience must be >= 1"),
    (T, ["--save-every", "-5"], "save_every must be >= 0"),
    (T, ["--log-every", "0"], "log_every must be >= 1"),
    (T, ["--stop-at-step", "0"], "stop_at_step must be >= 1"),
    (T, ["--mixed-precision", "fp8"], "invalid choice"),
    (T, ["--model-preset", "huge"], "unknown model preset 'huge'"),
    (T, ["--config", "{out}-missing.yaml"], "cannot read config file"),
    (T, ["--config", "{yaml_list}"], "must hold a mapping"),
    (T, ["--config", "{yaml_unknown}"], "unknown training setting(s): epoch"),
    (T, ["--config", "{yaml_bad_type}"], "epochs must be int, got 'ten'"),
    (T, ["--init-from", "{out}-no-such-model"], "does not exist"),
    (T, ["--freeze-blocks", "-1"], "freeze_blocks must be >= 0"),
    (T, ["--stability-dropout", "1.5"], "stability_dropout must be in [0, 1]"),
    (T, ["--model-overrides", "dropout=0.1"], "expected a JSON object"),
    (T, ["--model-overrides", '{{"dropot": 0.1}}'], "unknown model setting(s): dropot"),
    (T, ["--freeze-blocks", "1"], "freeze_blocks needs init_from"),
    (T, ["--data", "{out}-no-such-data"], "does not exist"),
    (T, ["--out", "{file}/out"], "cannot write to --out"),
    (T, ["--out", "{trained}"], "already holds a trained model"),
    # data_prep/prepare.py
    (P, ["--limit", "0"], "--limit must be >= 1"),
    (P, ["--limit", "some"], "invalid int value"),
    (P, ["--workers", "0"], "--workers must be >= 1"),
    (P, ["--max-sites", "0"], "--max-sites must be >= 1"),
    (P, ["--seed", "-2"], "--seed must be >= 0"),
    (P, ["--symprec", "0"], "--symprec must be > 0"),
    (P, ["--split", "family"], "invalid choice"),
    (P, ["--split", "system", "--val-fraction", "0.6", "--test-fraction", "0.6"], "fraction"),
    (P, ["--input", "{out}-missing.csv"], "does not exist"),
    (P, ["--out", "{results}"], "already holds files"),
    (P, ["--out", "{file}/out"], "cannot write to --out"),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad-input")
    model = save_random_model(root / "model")
    data = write_synthetic_dataset(root / "data", n_train=16, n_val=4, seed=0)
    trained = root / "trained"
    trained.mkdir()
    (trained / "model.safetensors").write_bytes(b"an earlier run's weights")
    yamls = {"yaml_list": "- epochs\n- 3\n", "yaml_unknown": "epoch: 3\n", "yaml_bad_type": "epochs: ten\n"}
    for name, text in yamls.items():
        (root / f"{name}.yaml").write_text(text)
    return {"root": root, "model": model, "data": data, "trained": trained,
            **{name: root / f"{name}.yaml" for name in yamls}}


def defaults(cli: str, f: dict, out: Path) -> dict[str, str]:
    """Valid values for the required flags, so that each case has exactly one bad value."""
    if cli == G:
        return {"--model": str(f["model"]), "--out": str(out), "-n": "2"}
    if cli == T:
        return {"--data": str(f["data"]), "--out": str(out), "--model-preset": "tiny", "--max-steps": "1"}
    return {"--input": str(SLICE), "--out": str(out), "--workers": "1"}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("cli, argv, expected", CASES, ids=[f"{c}:{' '.join(a)}" for c, a, _ in CASES])
def test_bad_value_is_one_line_exit_2_and_writes_nothing(cli, argv, expected, fixtures, tmp_path, capsys):
    out = tmp_path / "out"
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.csv").write_text("index,file\n0,earlier.cif\n")
    (results / "meta.json").write_text("{}")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    names = {**{k: str(v) for k, v in fixtures.items()}, "out": str(out), "results": str(results),
             "file": str(blocker)}
    argv = [a.format(**names) for a in argv]
    flags = defaults(cli, fixtures, out)
    for flag in argv:
        flags.pop(flag, None)  # the case's own value replaces the default one
    full = [x for kv in flags.items() for x in kv] + argv
    before = snapshot(results)

    module = load_script(str(CLIS[cli].relative_to(REPO)))
    try:
        code = module.main(full)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err

    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and expected in lines[0], err
    assert lines[0].startswith(f"{CLIS[cli].name}: error: ")
    assert not out.exists(), "a failed run left output behind"
    assert snapshot(results) == before and blocker.read_text() == "not a folder"
