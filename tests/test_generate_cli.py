"""generate.py end to end with a random-weight tiny model: files written, conditioning, filters,
seeds, and one-line errors (exit status 2) for each kind of bad input."""
from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pymatgen.core import Structure
from scripts import load_script

REPO = Path(__file__).resolve().parents[1]


CLI = load_script("generate.py")


def run(argv, capsys):
    code = CLI.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_summary(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_elements_ehull_writes_only_that_system_and_no_close_contacts(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(["--model", model_dir, "--elements", "Al", "Ca", "Cu", "--ehull", "low", "-n", 40,
                             "--batch-size", 20, "--seed", 0, "--out", out], capsys)
    assert code == 0, err
    assert "sampled 40, decoded 40" in stdout
    rows = read_summary(out)
    assert len(rows) == 40 and all(r["formula"] for r in rows)  # every sample decoded
    written = sorted(out.rglob("*.cif"))
    assert written and len(written) == sum(1 for r in rows if r["file"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in written:
            s = Structure.from_file(path)
            assert {el.symbol for el in s.composition.elements} == {"Al", "Ca", "Cu"}
            assert min(s.distance_matrix[s.distance_matrix > 0].min(initial=99), min(s.lattice.abc)) >= 0.7 - 1e-6
            index, formula, sg = path.stem.split("_")
            row = rows[int(index)]
            assert row["file"] == path.relative_to(out).as_posix() and row["reduced_formula"] == formula and sg == f"sg{row['requested_spacegroup']}"
    assert all(float(r["min_distance"]) >= 0.7 for r in rows if r["file"])
    assert all("too_close" in r["flags"] for r in rows if not r["file"])
    assert not list(out.rglob(".*"))  # no temporary files left behind


def test_spacegroup_and_formats_and_same_seed(model_dir, tmp_path, capsys):
    base = ["--model", model_dir, "--spacegroup", 221, "-n", 12, "--seed", 5]
    for fmt in ("json", "extxyz"):
        code, _, err = run(base + ["--format", fmt, "--out", tmp_path / fmt], capsys)
        assert code == 0, err
        rows = read_summary(tmp_path / fmt)
        assert {r["requested_spacegroup"] for r in rows} == {"221"}
        folder = tmp_path / fmt
        assert sorted(p.relative_to(folder).as_posix() for p in folder.glob(f"*/*.{fmt}")) == \
            sorted(r["file"] for r in rows if r["file"])
    # Same seed, other format: the same samples.
    assert [r["sequence"] for r in read_summary(tmp_path / "json")] == \
        [r["sequence"] for r in read_summary(tmp_path / "extxyz")]


def corrupt_models(model_dir: Path, tmp: Path) -> dict[str, Path]:
    bad_json = tmp / "bad_json"
    bad_json.mkdir()
    for f in model_dir.iterdir():
        (bad_json / f.name).write_bytes(f.read_bytes())
    (bad_json / "config.json").write_text("{not json")
    truncated = tmp / "truncated"
    truncated.mkdir()
    for f in model_dir.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    empty = tmp / "empty"
    empty.mkdir()
    return {"bad_json": bad_json, "truncated": truncated, "empty": empty}


def test_library_checks_arguments_at_the_call_not_at_the_first_item(model_dir):
    # A bad argument must fail where the call is written, not later wherever the iterator is drawn.
    from wyckoffgpt.generation import CrystalGenerator, InputError

    gen = CrystalGenerator.from_pretrained(model_dir)
    for bad in ({"top_p": 1.5}, {"temperature": 0}, {"elements": ["Al", "Al"]}, {"seed": -1}, {"n": 0}):
        kwargs = {"n": 2, **bad}
        with pytest.raises(InputError):
            gen.iter_generate(**kwargs)  # never advanced
        with pytest.raises(InputError):
            gen.generate(**kwargs)


@pytest.mark.parametrize("kind", ["missing", "bad_json", "truncated", "empty", "unwritable_out"])
def test_bad_model_or_out_one_line_exit_2(kind, model_dir, tmp_path, capsys):
    models = corrupt_models(model_dir, tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    model = {"missing": tmp_path / "no_such_model"}.get(kind, models.get(kind, model_dir))
    out = blocker / "out" if kind == "unwritable_out" else tmp_path / "out"
    code, _, err = run(["--model", model, "--out", out, "-n", 2], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    expected = {"missing": "does not exist", "unwritable_out": "cannot write to --out", "empty": "no config.json"}
    assert expected.get(kind, "corrupt") in err


def test_without_model_and_without_bundled_model_says_which_to_pass(tmp_path, capsys, monkeypatch):
    from wyckoffgpt import generation

    # An installation whose bundled model folder is missing (e.g. stripped by a packager).
    monkeypatch.setattr(generation, "PRETRAINED_DIR", tmp_path / "no_pretrained")
    code, _, err = run(["--out", tmp_path / "out", "-n", 2], capsys)
    assert code == 2 and "--model" in err and len(err.strip().splitlines()) == 1


def test_real_process_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), "-n", "0", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["generate.py: error: number of samples must be a positive integer, got 0"]


def test_charge_check_smact_writes_only_smact_valid_crystals(model_dir, tmp_path, capsys):
    from wyckoffgpt.chemistry import smact_valid

    out = tmp_path / "run"
    code, stdout, err = run(["--model", model_dir, "--elements", "Na", "Cl", "O", "-n", 24, "--batch-size", 12,
                             "--seed", 1, "--charge-check", "smact", "--out", out], capsys)
    assert code == 0, err
    assert "charge check smact" in stdout
    rows = read_summary(out)
    assert len(rows) == 24 and {r["charge_balanced"] for r in rows} <= {"true", "false"}
    written = [r for r in rows if r["file"]]
    assert written and all(r["charge_balanced"] == "true" for r in written)
    assert all(smact_valid(r["reduced_formula"]) for r in written)
    assert all("not_charge_balanced" in r["flags"] for r in rows if r["charge_balanced"] == "false")


def test_charge_check_off_keeps_the_compositions_the_model_drew(model_dir, tmp_path, capsys):
    from wyckoffgpt.chemistry import passes_charge_check

    args = ["--model", model_dir, "--elements", "Na", "Cl", "O", "-n", 24, "--batch-size", 12, "--seed", 1,
            "--max-retries", 0]
    code, stdout, err = run(args + ["--out", tmp_path / "default"], capsys)
    assert code == 0, err
    default = read_summary(tmp_path / "default")
    failing = [r for r in default if "not_charge_balanced" in r["flags"]]
    assert failing and not any(r["file"] for r in failing)  # a random model draws unbalanced Na-Cl-O
    placed = [r for r in failing if "too_close" not in r["flags"]]
    assert f"{len(placed)} failed the charge check (ionic)" in stdout
    code, _, err = run(args + ["--charge-check", "off", "--out", tmp_path / "off"], capsys)
    assert code == 0, err
    off = read_summary(tmp_path / "off")
    assert [r["sequence"] for r in off] == [r["sequence"] for r in default]  # no retries: the same draws
    assert not any("not_charge_balanced" in r["flags"] for r in off)
    assert any(r["file"] and not passes_charge_check(r["reduced_formula"], "ionic") for r in off)


def test_cli_defaults_are_the_librarys_sampling_config():
    # One home for the sampling defaults: a flag per SamplingConfig field; a flag left out takes the
    # model's recommendation (sampling_config.json) or else the library's default, as
    # `CrystalGenerator.generate` does when given nothing.
    from wyckoffgpt.chemistry import CHARGE_CHECKS
    from wyckoffgpt.sampling import SamplingConfig

    args = CLI.parse_args([])
    assert CLI.sampling_config(args) == SamplingConfig()
    recommended = SamplingConfig(guidance=3.0, guidance_contrast="unknown")
    assert CLI.sampling_config(args, recommended) == recommended
    assert CLI.sampling_config(CLI.parse_args(["--guidance", "1"]), recommended) == \
        SamplingConfig(guidance_contrast="unknown")
    assert [CLI.parse_args(["--charge-check", c]).charge_check for c in CHARGE_CHECKS] == list(CHARGE_CHECKS)
    given = CLI.parse_args(["--temperature", "0.8", "--top-p", "0.9", "--batch-size", "16", "--seed", "5",
                            "--min-distance", "0.5", "--max-retries", "0", "--charge-check", "off",
                            "--symprec", "0.1"])
    assert CLI.sampling_config(given) == SamplingConfig(temperature=0.8, top_p=0.9, batch_size=16, seed=5,
                                                        min_distance=0.5, max_retries=0, charge_check="off",
                                                        symprec=0.1)


def test_model_folders_recommended_guidance_is_used_and_recorded_unless_a_flag_says_otherwise(tmp_path, capsys):
    import json
    import shutil

    from random_model import save_random_model

    from wyckoffgpt.sampling import SamplingConfig

    model = save_random_model(tmp_path / "model")
    SamplingConfig(guidance=4.0, guidance_contrast="unknown").save_pretrained(model)
    base = ["--model", model, "--ehull", "low", "-n", 6, "--seed", 1]
    code, stdout, err = run(base + ["--out", tmp_path / "recommended"], capsys)
    assert code == 0, err
    assert "guidance 4 against unknown" in stdout
    recorded = json.loads((tmp_path / "recommended" / "run.json").read_text())
    assert (recorded["guidance"], recorded["guidance_contrast"]) == (4.0, "unknown")
    code, _, err = run(base + ["--guidance", 4, "--guidance-contrast", "unknown", "--out", tmp_path / "flags"], capsys)
    assert code == 0, err
    assert [r["sequence"] for r in read_summary(tmp_path / "flags")] == \
        [r["sequence"] for r in read_summary(tmp_path / "recommended")]
    code, _, err = run(base + ["--guidance", 1, "--out", tmp_path / "off"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "off" / "run.json").read_text())["guidance"] == 1.0
    assert [r["sequence"] for r in read_summary(tmp_path / "off")] != \
        [r["sequence"] for r in read_summary(tmp_path / "recommended")]
    (model / "sampling_config.json").write_text('{"seed": 3}')
    code, _, err = run(base + ["--out", tmp_path / "bad"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "sampling_config.json" in err and "'seed' is not a setting a model can recommend" in err
    shutil.rmtree(model)
