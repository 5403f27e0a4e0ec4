"""Temperature sweeps: the same request sampled at several temperatures, each sample set measured
with `wyckoffgpt.metrics`, as a table (one row per temperature) and a plot.

    from wyckoffgpt.generation import CrystalGenerator, resolve_model_path
    from wyckoffgpt.metrics import model_reference
    from wyckoffgpt.sweep import plot_sweep, run_sweep, sweep_rows, write_table

    folder = resolve_model_path(None)  # the bundled model
    gen = CrystalGenerator.from_pretrained(folder)
    points = run_sweep(gen, [0.7, 1.0, 1.3], 300, reference=model_reference(folder), seed=0)
    write_table(sweep_rows(points), "sweep.csv")
    plot_sweep(points, "sweep.png")

Raising the temperature flattens the model's distributions: more samples unlike the training
crystals (novel), fewer that are physically sound (valid). `python generate.py --temperatures ...`
is the command line for it.
"""
from __future__ import annotations

import csv
import io
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write
from .metrics import CDVAE_MIN_DISTANCE, ReferenceSet, SampleSetMetrics, sample_set_metrics
from .sampling import FIELD_NAMES, SamplingConfig

if TYPE_CHECKING:
    from .generation import CrystalGenerator, GeneratedCrystal

PLOT_INSTALL_HINT = 'the plot needs matplotlib: pip install "wyckoffgpt[plot]"'


@dataclass
class SweepPoint:
    """One temperature of a sweep: its samples (duplicates flagged) and their metrics."""

    temperature: float
    seed: int
    min_distance: float  # Å, the distance threshold of "valid"
    results: list[GeneratedCrystal]
    metrics: SampleSetMetrics
    seconds: float  # sampling and measuring this temperature


def check_temperatures(temperatures: Sequence[float]) -> list[float]:
    """The temperatures as floats; ValueError naming the first bad one (each must be finite and > 0)."""
    out = [float(t) for t in temperatures]
    if not out:
        raise ValueError("a sweep needs at least one temperature")
    for t in out:
        if not 0 < t < float("inf"):
            raise ValueError(f"temperatures must be > 0, got {t:g}")
    if len(set(out)) != len(out):
        raise ValueError(f"temperatures must differ, got {' '.join(f'{t:g}' for t in out)}")
    return out


def run_sweep(gen: CrystalGenerator, temperatures: Sequence[float], n: int, reference: ReferenceSet | None, *,
              config: SamplingConfig | None = None, on_finished: Callable[[int], None] | None = None,
              on_point: Callable[[SweepPoint], None] | None = None, **generate_kwargs: Any) -> list[SweepPoint]:
    """Sample `n` crystals at each temperature (in the order given, each with the same seed; seed
    None: one random seed for all) and measure each set against `reference`. `config` and the
    keyword overrides of its fields (`seed=0`, `charge_check="off"`, ...) are the sampling
    settings but the temperature; the other `generate_kwargs` go to `CrystalGenerator.generate`
    (elements, ehull, spacegroup, formula, ...). `on_finished` counts finished samples across the
    whole sweep; `on_point` receives each temperature's point as soon as it is measured (e.g. to
    write its structures)."""
    temperatures = check_temperatures(temperatures)
    config = gen.sampling_config(config, **{k: generate_kwargs.pop(k) for k in FIELD_NAMES if k in generate_kwargs})
    if config.seed is None:
        config = config.replace(seed=secrets.randbits(63))
    points = []
    for temperature in temperatures:
        t0 = time.perf_counter()
        results = gen.generate(n, config=config.replace(temperature=temperature), check_unique=False,
                               on_finished=on_finished, **generate_kwargs)
        measured = sample_set_metrics(results, reference)
        flag_duplicates(results, measured)
        point = SweepPoint(temperature, config.seed, config.min_distance, results, measured, time.perf_counter() - t0)
        if on_point is not None:
            on_point(point)
        points.append(point)
    return points


def flag_duplicates(results: list[GeneratedCrystal], measured: SampleSetMetrics) -> None:
    """Flag the written (valid) results that repeat an earlier one as "duplicate", from the metrics'
    uniqueness, as `generation.mark_duplicates` would (the charge check depends on the composition
    only, and only same-formula structures can match, so both see the same groups)."""
    for k, unique in zip(measured.valid_index, measured.unique_flags):
        if not unique and results[k].valid and "duplicate" not in results[k].flags:
            results[k].flags.append("duplicate")


def sweep_rows(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """One table row per temperature: temperature, the metrics' row, the distance threshold of
    `valid` (Å), seed and seconds."""
    return [{"temperature": p.temperature, **p.metrics.row(), "min_distance": p.min_distance, "seed": p.seed,
             "seconds": round(p.seconds, 1)} for p in points]


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return round(value, 4) if isinstance(value, float) else value


def table_text(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text of the rows (fractions and distances to 4 decimals, missing values empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def write_table(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write the rows as CSV, atomically."""
    path = Path(path)
    atomic_write(path, table_text(rows))
    return path


def require_matplotlib() -> None:
    """ImportError with the install hint when matplotlib is missing (the `plot` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(PLOT_INSTALL_HINT) from None


# (label, metrics row key) per panel: the validity chain as shares of all samples, then what the
# valid samples are like as shares of the valid ones.
_CHAIN = (("decoded", "decoded"), (f"no atoms closer than {CDVAE_MIN_DISTANCE} Å", "dist_valid_0.5"),
          ("valid: none closer than {threshold} Å", "valid"), ("SMACT-valid (of all)", "smact_valid"))
_OF_VALID = (("space-group consistent", "sg_consistent"), ("unique", "unique"), ("novel", "novel"),
             ("unique and novel", "unique_novel"))


_STYLES = (("o", "-", 9), ("s", "--", 7), ("^", "-.", 6), ("D", ":", 4))  # overlapping lines stay visible


def plot_sweep(points: Sequence[SweepPoint], path: str | os.PathLike, conditions: str = "") -> Path:
    """A PNG of the validity chain (left) and uniqueness and novelty (right) against temperature;
    `conditions` (e.g. "Al-Ca-Cu, ehull low") goes into the title."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sweep_rows(points)
    temps = [r["temperature"] for r in rows]
    fig = Figure(figsize=(10, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    panels = ((_CHAIN, "fraction of all samples", "validity chain"),
              (_OF_VALID, "fraction of valid samples", "uniqueness and novelty of the valid samples"))
    for k, (series, ylabel, subtitle) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for (label, key), (marker, line, size) in zip(series, _STYLES):
            values = [r[key] for r in rows]
            if all(v is not None for v in values):
                ax.plot(temps, values, marker=marker, linestyle=line, markersize=size,
                        label=label.format(threshold=f"{points[0].min_distance:g}"))
        ax.set_xlabel("sampling temperature T (dimensionless)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.02)
        ax.set_xticks(temps)
        ax.set_title(subtitle, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    n = rows[0]["n"] if len({r["n"] for r in rows}) == 1 else "various"
    fig.suptitle(f"Temperature sweep{f' ({conditions})' if conditions else ''}: n = {n} samples per temperature",
                 fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path
