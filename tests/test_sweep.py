"""Temperature sweeps from the command line with a random-weight tiny model: one folder per
temperature, a table with one row per temperature, a PNG, and one-line errors (exit 2, nothing
written) for bad input."""
from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest
from scripts import load_script

CLI = load_script("generate.py")


@pytest.fixture(scope="module")
def reference_csv(slice_records, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "reference.csv"
    records = slice_records[:8]
    pd.DataFrame({"material_id": [r.key for r, _ in records], "cif": [r.cif for r, _ in records]}).to_csv(path)
    return path


def run(argv, capsys):
    code = CLI.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_writes_a_folder_per_temperature_a_table_and_a_plot(model_dir, reference_csv, tmp_path, capsys):
    out, report, plot = tmp_path / "sweep", tmp_path / "sweep.csv", tmp_path / "sweep.png"
    with_plot = importlib.util.find_spec("matplotlib") is not None  # the `plot` extra
    code, stdout, err = run(["--model", model_dir, "--temperatures", 0.8, 1.5, "-n", 6, "--seed", 0,
                             "--elements", "Na", "Cl", "--reference", reference_csv, "--report", report,
                             "--out", out] + (["--plot", plot] if with_plot else []), capsys)
    assert code == 0, err
    rows = read_csv(report)
    assert [float(r["temperature"]) for r in rows] == [0.8, 1.5]
    assert int(rows[0]["n_valid"]) > 0
    for r in rows:
        assert int(r["n"]) == 6
        for name in ("valid", "decoded", "dist_valid_0.5", "smact_valid"):  # rates of all samples
            assert 0 <= float(r[name]) <= 1 and r[f"n_{name}"].isdigit()
        assert int(r["n_unique"]) <= int(r["n_valid"]) <= int(r["n_dist_valid_0.5"]) <= int(r["n_decoded"]) == 6
        assert int(r["n_novel"]) <= int(r["n_valid"]) and int(r["n_sg_consistent"]) <= int(r["n_valid"])
        if int(r["n_valid"]):  # rates of the valid samples and their distribution: undefined without any
            assert all(0 <= float(r[k]) <= 1 for k in ("unique", "novel", "sg_consistent", "unique_novel"))
            assert float(r["wasserstein_density"]) >= 0 and float(r["wasserstein_n_elements"]) >= 0
            assert sum(float(r[k]) for k in r if k.startswith("share_")) == pytest.approx(1.0, abs=1e-3)
        assert str(reference_csv) in r["reference"]
    for t in ("0.8", "1.5"):
        summary = read_csv(out / f"T{t}" / "summary.csv")
        assert len(summary) == 6 and {s["temperature"] for s in summary} == {t}
        assert all(set(s["reduced_formula"]) and "Na" in s["formula"] for s in summary if s["formula"])
        assert len(list((out / f"T{t}").glob("*/*.cif"))) == sum(1 for s in summary if s["file"])  # in shards
    assert not with_plot or plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 temperatures x 6 samples" in stdout and " s\n" in stdout  # total time printed


def test_sweep_without_reference_leaves_novelty_empty(model_dir, tmp_path, capsys):
    code, stdout, err = run(["--model", model_dir, "--temperatures", 1.0, "-n", 3, "--seed", 1,
                             "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert "reference: none" in stdout
    (row,) = read_csv(tmp_path / "o" / "sweep.csv")  # the table's default place
    assert row["novel"] == "" and row["wasserstein_density"] == "" and row["reference"] == ""
    assert row["valid"] != ""


@pytest.mark.parametrize("name", ["zero_temperature", "negative", "both_temperature_flags", "report_alone",
                                  "report_exists", "missing_reference", "no_matplotlib"])
def test_bad_sweep_input_one_line_exit_2_nothing_written(name, model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    report = tmp_path / "r.csv"
    base = ["--model", model_dir, "-n", 2, "--out", out, "--report", report]
    argv = {
        "zero_temperature": base + ["--temperatures", 0.7, 0],
        "negative": base + ["--temperatures", -1],
        "both_temperature_flags": base + ["--temperature", 1.0, "--temperatures", 0.7],
        "report_alone": base,
        "report_exists": base + ["--temperatures", 1.0],
        "missing_reference": base + ["--temperatures", 1.0, "--reference", tmp_path / "nope.csv"],
        "no_matplotlib": base + ["--temperatures", 1.0, "--plot", tmp_path / "p.png"],
    }[name]
    if name == "report_exists":
        report.write_text("earlier results\n")
    if name == "no_matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    code, stdout, err = run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    if name == "no_matplotlib":
        assert 'pip install "wyckoffgpt[plot]"' in err
    assert not out.exists()
    assert report.exists() == (name == "report_exists")
    if name == "report_exists":
        assert report.read_text() == "earlier results\n"
