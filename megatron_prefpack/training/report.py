"""``prefpack report RUN_DIR``: charts of a training run from its ``metrics.jsonl``.

Reads ``RUN_DIR/metrics.jsonl`` (written by :class:`~megatron_prefpack.training.metrics.MetricsLogger`:
one object per line, ``{"split": "train"|"eval", "step": int, "time": float, <metric>: number,
...}``, non-finite values as the strings ``"nan"``, ``"inf"``, ``"-inf"``) and writes into
``--output`` (default ``RUN_DIR/report``) one PNG per chart whose metrics the file holds:

- ``loss.png``: ``loss``, train and eval;
- ``rewards.png``: reward accuracy and margin (``rewards/accuracies`` and ``rewards/margins``,
  or the older ``rewards/accuracy`` / ``rewards/margin``), train and eval (DPO, reward models;
  an SFT run has none);
- ``learning_rate.png``: ``lr``;
- ``throughput.png``: ``tokens_per_s`` and ``tflops_per_device``;
- ``grad_norm.png``: ``grad_norm``;
- ``memory.png``: ``mem/max_allocated_gib`` and ``mem/max_reserved_gib`` (CUDA runs);

plus ``report.md``, an index: what was read, the last value of every plotted series, and the
charts. The x axis is the optimizer step. A resumed run appends to the file, so a
(split, step) may appear more than once (the evaluation at the step a run resumed from, steps
trained again after a crash): the last record of each is kept, and the report says how many were
replaced. Non-finite values leave a gap in their line and are marked by an ``x`` on the axis at
their step. A missing file, a malformed line (not a JSON object, no ``split``/``step``, a value
that is neither a number nor one of those strings) stops with ``file:line: reason``, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron_prefpack.data import plotting

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

EXIT_BAD_INPUT = 2
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
"""How ``MetricsLogger`` writes the values JSON cannot hold."""
SPLITS = ("train", "eval")


class MetricsFileError(ValueError):
    """A metrics file that cannot be read; the message starts with ``file:line:``."""


@dataclass
class RunMetrics:
    """The records of a ``metrics.jsonl``: the last one per (split, step)."""

    path: Path
    records: dict[str, dict[int, dict[str, float]]]
    """split -> step -> metric -> value (non-finite values as floats)."""
    read: int
    """Records in the file."""
    replaced: int
    """Records superseded by a later record of the same (split, step)."""

    def series(self, split: str, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric in ``split``, by step; ``names`` are its spellings, and
        each record contributes the first it holds (a run resumed across a rename has both)."""
        points = []
        for step, record in sorted(self.records.get(split, {}).items()):
            value = next((record[n] for n in names if n in record), None)
            if value is not None:
                points.append((step, value))
        steps, values = zip(*points, strict=True) if points else ((), ())
        return np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64)


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse ``path`` (a ``metrics.jsonl``). Raises :class:`MetricsFileError` naming the file
    and line of the first malformed record, or the file when it is missing or holds none."""
    path = Path(path)
    records: dict[str, dict[int, dict[str, float]]] = {}
    read = replaced = 0
    try:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                split, step, values = _parse_record(line, f"{path}:{line_no}")
                read += 1
                replaced += step in records.setdefault(split, {})
                records[split][step] = values
    except FileNotFoundError:
        raise MetricsFileError(f"{path}: no such file (is it a `prefpack train` run.dir?)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MetricsFileError(f"{path}: cannot read: {err}") from None
    if not read:
        raise MetricsFileError(f"{path}: no metric records")
    return RunMetrics(path, records, read, replaced)


def _parse_record(line: str, where: str) -> tuple[str, int, dict[str, float]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise MetricsFileError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise MetricsFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    split, step = record.pop("split", None), record.pop("step", None)
    if not isinstance(split, str) or not split:
        raise MetricsFileError(f"{where}: field 'split': expected a name such as 'train', got {split!r}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise MetricsFileError(f"{where}: field 'step': expected an integer >= 0, got {step!r}")
    values = {}
    for key, value in record.items():
        if isinstance(value, str) and value in NONFINITE:
            value = NONFINITE[value]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MetricsFileError(
                f"{where}: field {key!r}: expected a number or one of {sorted(NONFINITE)}, got {value!r}"
            )
        values[key] = float(value)
    return split, step, values


@dataclass(frozen=True)
class Panel:
    """One axes of a chart: a metric (``names``: its spellings, current first) per split."""

    title: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class ChartSpec:
    name: str
    """File stem of the PNG."""
    title: str
    panels: tuple[Panel, ...]


CHARTS = (
    ChartSpec("loss", "Loss", (Panel("loss", ("loss",)),)),
    ChartSpec(
        "rewards",
        "Implicit rewards",
        (
            Panel("reward accuracy", ("rewards/accuracies", "rewards/accuracy")),
            Panel("reward margin", ("rewards/margins", "rewards/margin")),
        ),
    ),
    ChartSpec("learning_rate", "Learning rate", (Panel("learning rate", ("lr",)),)),
    ChartSpec(
        "throughput",
        "Throughput",
        (Panel("tokens/s", ("tokens_per_s",)), Panel("TFLOP/s per device", ("tflops_per_device",))),
    ),
    ChartSpec("grad_norm", "Gradient norm", (Panel("gradient norm", ("grad_norm",)),)),
    ChartSpec(
        "memory",
        "Peak GPU memory",
        (
            Panel("max allocated (GiB)", ("mem/max_allocated_gib",)),
            Panel("max reserved (GiB)", ("mem/max_reserved_gib",)),
        ),
    ),
)


@dataclass
class Chart:
    """A drawn chart. ``lines[(metric, split)]`` is the line of that series (``metric`` = the
    panel's first spelling); ``nonfinite[(metric, split)]`` marks its non-finite steps (only
    where there are some)."""

    spec: ChartSpec
    figure: Figure
    lines: dict[tuple[str, str], Line2D] = field(default_factory=dict)
    nonfinite: dict[tuple[str, str], Line2D] = field(default_factory=dict)


def build_charts(metrics: RunMetrics) -> list[Chart]:
    """The charts of :data:`CHARTS` for which ``metrics`` holds at least one series; a panel
    without data is left out of its chart."""
    charts = []
    for spec in CHARTS:
        drawn = []
        for panel in spec.panels:
            data = {split: metrics.series(split, panel.names) for split in _splits(metrics)}
            data = {split: series for split, series in data.items() if len(series[0])}
            if data:
                drawn.append((panel, data))
        if not drawn:
            continue
        figure, axes = plotting.new_figure(len(drawn), columns=2)
        chart = Chart(spec, figure)
        for ax, (panel, data) in zip(axes, drawn, strict=True):
            _draw_panel(ax, panel, data, chart)
        figure.suptitle(f"{spec.title}: {metrics.path}", fontsize=10)
        charts.append(chart)
    return charts


def _splits(metrics: RunMetrics) -> list[str]:
    """Train and eval first, then any other split the file names."""
    return [*(s for s in SPLITS if s in metrics.records), *sorted(set(metrics.records) - set(SPLITS))]


def _draw_panel(ax: Any, panel: Panel, data: dict[str, tuple[np.ndarray, np.ndarray]], chart: Chart) -> None:
    metric = panel.names[0]
    for split, (steps, values) in data.items():
        sparse = split != "train" or len(steps) <= 30
        (line,) = ax.plot(steps, values, marker="o" if sparse else None, markersize=3, label=split)
        chart.lines[(metric, split)] = line
        bad = ~np.isfinite(values)
        if bad.any():
            (marks,) = ax.plot(
                steps[bad],
                np.zeros(int(bad.sum())),
                linestyle="none",
                marker="x",
                color=line.get_color(),
                transform=ax.get_xaxis_transform(),  # x in steps, y at the bottom of the axes
                clip_on=False,
                label=f"{split}: non-finite",
            )
            chart.nonfinite[(metric, split)] = marks
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_report(metrics: RunMetrics, output: Path) -> list[Path]:
    """Draw the charts of ``metrics`` into ``output`` (created) and the index ``report.md``;
    returns the files written, the index last."""
    output.mkdir(parents=True, exist_ok=True)
    charts = build_charts(metrics)
    written = [plotting.save_png(chart.figure, output / f"{chart.spec.name}.png") for chart in charts]
    index = output / "report.md"
    index.write_text(_index_text(metrics, charts), encoding="utf-8")
    return [*written, index]


def _summary(metrics: RunMetrics) -> list[str]:
    """What was read: records, steps per split, replaced records."""
    lines = [f"{metrics.read} records in {metrics.path}:"]
    for split in _splits(metrics):
        steps = sorted(metrics.records[split])
        lines.append(f"- {split}: {len(steps)} steps, {steps[0]} to {steps[-1]}")
    if metrics.replaced:
        lines.append(
            f"- records repeating an earlier (split, step), as a resumed run appends them: "
            f"{metrics.replaced}; the last record of each (split, step) is plotted"
        )
    return lines


def _index_text(metrics: RunMetrics, charts: list[Chart]) -> str:
    rows = []
    for chart in charts:
        for (metric, split), line in chart.lines.items():
            steps, values = line.get_xdata(), line.get_ydata()
            bad = int((~np.isfinite(values)).sum())
            rows.append(f"| {metric} | {split} | {steps[-1]} | {values[-1]:.6g} | {bad} |")
    parts = [
        f"# Training report: {metrics.path.parent}",
        "",
        *_summary(metrics),
        "",
        "| metric | split | last step | last value | non-finite |",
        "|---|---|---:|---:|---:|",
        *rows,
        "",
    ]
    for chart in charts:
        parts += [f"## {chart.spec.title}", "", f"![{chart.spec.title}]({chart.spec.name}.png)", ""]
    return "\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `prefpack train` run.dir (holds metrics.jsonl)")
    parser.add_argument("--output", default=None, help="where the charts go (default RUN_DIR/report)")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    output = Path(args.output) if args.output else run_dir / "report"
    try:
        plotting.require_matplotlib()
        metrics = read_metrics(run_dir / "metrics.jsonl")
        written = write_report(metrics, output)
    except (MetricsFileError, plotting.PlottingUnavailable) as err:
        print(f"prefpack report: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        print(f"prefpack report: error: cannot write to {output}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("\n".join(_summary(metrics)))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
