"""Charts: ``prefpack report RUN_DIR`` and ``prefpack bench packing|step --plot``.

- the plotted series equal the values of ``metrics.jsonl`` as an independent parse of the file
  reads them (last record per (split, step), ``"nan"``/``"inf"`` as floats, both spellings of
  the reward metrics), for a synthetic file and for real ``prefpack train`` runs (DPO resumed,
  so a (split, step) repeats; SFT, which has no reward chart); non-finite steps are marked;
- the PNGs and ``report.md`` are written and are valid images;
- a missing file, malformed lines and a missing matplotlib stop with exit 2 and say why;
- the bench charts' bar heights are the ``--json`` figures and their notes the JSON's ratios.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_prefpack.cli import main

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPELLINGS = {
    "rewards/accuracies": ("rewards/accuracies", "rewards/accuracy"),
    "rewards/margins": ("rewards/margins", "rewards/margin"),
}
"""Current name -> every spelling a file may hold (older runs wrote the singular)."""
CHART_METRICS = {
    "loss": ["loss"],
    "rewards": ["rewards/accuracies", "rewards/margins"],
    "learning_rate": ["lr"],
    "throughput": ["tokens_per_s", "tflops_per_device"],
    "grad_norm": ["grad_norm"],
    "memory": ["mem/max_allocated_gib", "mem/max_reserved_gib"],
}


def last_records(path: Path) -> dict[tuple[str, int], dict]:
    """The test's own reading of a metrics file: (split, step) -> its last record."""
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        records[(record["split"], record["step"])] = record
    return records


def expected_series(records: dict[tuple[str, int], dict], split: str, metric: str) -> tuple[list, list]:
    steps, values = [], []
    for (s, step), record in sorted(records.items(), key=lambda item: item[0][1]):
        found = [record[n] for n in SPELLINGS.get(metric, (metric,)) if n in record]
        if s == split and found:
            steps.append(step)
            values.append(float(found[0]))  # float("nan"), float("-inf") read the logger's strings
    return steps, values


def check_charts_follow_the_file(path: Path) -> dict[str, set[tuple[str, str]]]:
    """Every chart line equals the file's series, every series of the file is plotted, the
    non-finite marks sit at the non-finite steps. Returns chart name -> plotted (metric, split)."""
    from megatron_prefpack.training.report import build_charts, read_metrics

    records = last_records(path)
    splits = {split for split, _ in records}
    charts = {chart.spec.name: chart for chart in build_charts(read_metrics(path))}
    wanted = {
        name: {(m, s) for m in metrics for s in splits if expected_series(records, s, m)[0]}
        for name, metrics in CHART_METRICS.items()
    }
    assert set(charts) == {name for name, series in wanted.items() if series}
    for name, chart in charts.items():
        assert set(chart.lines) == wanted[name]
        drawn = {id(line) for ax in chart.figure.axes for line in ax.lines}
        for (metric, split), line in chart.lines.items():
            steps, values = expected_series(records, split, metric)
            assert id(line) in drawn and line.get_label() == split
            np.testing.assert_array_equal(line.get_xdata(), steps)
            np.testing.assert_array_equal(line.get_ydata(), values)  # NaN equals NaN here
            bad = [step for step, v in zip(steps, values, strict=True) if not math.isfinite(v)]
            marks = chart.nonfinite.get((metric, split))
            assert (list(marks.get_xdata()) if marks else []) == bad
    return {name: set(chart.lines) for name, chart in charts.items()}


def check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dpo_records() -> list[dict]:
    """A resumed DPO run: step 2 written twice (the second wins), eval at step 2 twice, a NaN
    loss and grad norm, an infinite margin, the reward metrics renamed between the runs."""
    train = {"lr": 1e-3, "tokens_per_s": 100.0, "tflops_per_device": 0.01, "grad_norm": 1.0}
    train |= {"mem/max_allocated_gib": 1.5, "mem/max_reserved_gib": 2.0}
    old = {"rewards/accuracy": 0.5, "rewards/margin": 0.1}
    return [
        {"split": "eval", "step": 0, "time": 0.0, "loss": 0.69, **old, "count": 4},
        {"split": "train", "step": 1, "time": 1.0, "loss": 0.70, **old, **train},
        {"split": "train", "step": 2, "time": 2.0, "loss": 0.65, **old, **train},
        {"split": "eval", "step": 2, "time": 2.5, "loss": 0.66, **old, "count": 4},
        # the run resumed from step 1 here: step 2 again, with the new names
        {"split": "train", "step": 2, "time": 3.0, "loss": 0.61, "rewards/accuracies": 0.75,
         "rewards/margins": "inf", **train, "grad_norm": "nan", "lr": 5e-4},
        {"split": "eval", "step": 2, "time": 3.5, "loss": 0.60, "rewards/accuracies": 1.0,
         "rewards/margins": 0.2, "count": 4},
        {"split": "train", "step": 3, "time": 4.0, "loss": "nan", "rewards/accuracies": 0.25,
         "rewards/margins": "-inf", **train, "tokens_per_s": 90.0},
    ]  # fmt: skip


def test_report_of_a_synthetic_run(tmp_path, capsys):
    path = write_jsonl(tmp_path / "run" / "metrics.jsonl", dpo_records())
    from megatron_prefpack.training.report import read_metrics

    metrics = read_metrics(path)
    assert (metrics.read, metrics.replaced) == (7, 2)
    plotted = check_charts_follow_the_file(path)
    assert plotted["loss"] == {("loss", "train"), ("loss", "eval")}
    assert ("rewards/accuracies", "eval") in plotted["rewards"]
    step2 = metrics.records["train"][2]  # the last record of step 2 wins
    assert step2["loss"] == 0.61 and step2["rewards/margins"] == math.inf and math.isnan(step2["grad_norm"])

    assert main(["report", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    names = list(CHART_METRICS)
    for name in names:
        check_png(tmp_path / "out" / f"{name}.png")
        assert str(tmp_path / "out" / f"{name}.png") in out
    index = (tmp_path / "out" / "report.md").read_text()
    assert "repeating an earlier (split, step), as a resumed run appends them: 2" in out
    assert "repeating an earlier (split, step), as a resumed run appends them: 2" in index
    assert all(f"({name}.png)" in index for name in names)
    assert "| loss | train | 3 | nan | 1 |" in index and "| rewards/margins | train | 3 | -inf | 2 |" in index


def test_sft_run_has_no_reward_chart(tmp_path):
    records = [
        {"split": "train", "step": s, "time": float(s), "loss": 5.0 - s, "lr": 1e-3, "grad_norm": 2.0}
        for s in (1, 2, 3)
    ]
    path = write_jsonl(tmp_path / "metrics.jsonl", records)
    plotted = check_charts_follow_the_file(path)
    assert set(plotted) == {"loss", "learning_rate", "grad_norm"}
    assert main(["report", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "grad_norm.png",
        "learning_rate.png",
        "loss.png",
        "report.md",
    ]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "metrics.jsonl: no such file"),
        ("", "metrics.jsonl: no metric records"),
        ('{"split": "train", "step": 1, "loss": 1.0}\n{"split": "train", "st', "metrics.jsonl:2: not JSON"),
        ("\n[1, 2]\n", "metrics.jsonl:2: expected a JSON object, got list"),
        ('{"split": "train", "loss": 1.0}\n', "metrics.jsonl:1: field 'step': expected an integer >= 0"),
        ('{"step": 1, "loss": 1.0}\n', "metrics.jsonl:1: field 'split'"),
        (
            '{"split": "train", "step": 1, "loss": "NaN?"}\n',
            "metrics.jsonl:1: field 'loss': expected a number",
        ),
        ('{"split": "train", "step": 1, "loss": null}\n', "metrics.jsonl:1: field 'loss': expected a number"),
        ('{"split": "train", "step": 1, "loss": true}\n', "metrics.jsonl:1: field 'loss': expected a number"),
    ],
)
def test_report_refuses_bad_input(tmp_path, content, says, capsys):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert says in captured.err and str(tmp_path) in captured.err and not captured.out
    assert not (tmp_path / "report").exists()


def test_a_missing_matplotlib_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    from tests.test_train import make_dataset

    write_jsonl(tmp_path / "metrics.jsonl", dpo_records())
    data = make_dataset(tmp_path / "ds", num_groups=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    hint = "pip install 'megatron-prefpack[plot]'"
    assert main(["report", str(tmp_path)]) == 2
    assert hint in capsys.readouterr().err
    step = ["bench", "step", "--data", str(data), "--preset", "tiny-moe", "--plot", str(tmp_path / "s.png")]
    assert main(step) == 2
    assert hint in capsys.readouterr().err
    packing = ["bench", "packing", "--data", "/nonexistent.jsonl", "--tokenizer", "x", "--seq-len", "64"]
    assert main([*packing, "--plot", str(tmp_path / "p.png")]) == 2
    assert hint in capsys.readouterr().err  # named before the missing data file
    assert not list(tmp_path.glob("*.png"))


def bar_panels(figure) -> dict[str, tuple[list[str], list[float], list[str]]]:
    """Title -> (bar names, bar heights, notes over the bars) of each axes of a bar chart."""
    panels = {}
    for ax in figure.axes:
        names = [t.get_text() for t in ax.get_xticklabels()]
        heights = [bar.get_height() for bar in ax.patches]
        panels[ax.get_title()] = (names, heights, [t.get_text() for t in ax.texts])
    return panels


def check_bars(figure, layouts: dict, columns: dict[str, tuple[str, float]], ratios: dict[str, dict]) -> None:
    """Each panel ``title: (json key, scale)`` has one bar per layout, as high as the JSON's
    figure; ``ratios[title][layout]`` lists the ratio notes its bar must carry."""
    panels = bar_panels(figure)
    assert set(panels) == set(columns)
    for title, (key, scale) in columns.items():
        names, heights, notes = panels[title]
        assert names == list(layouts)
        np.testing.assert_allclose(heights, [layouts[n][key] * scale for n in names], rtol=1e-12)
        for name, note in zip(names, notes, strict=True):
            assert note.split("\n")[1:] == ratios.get(title, {}).get(name, []), (title, name)


@pytest.fixture(scope="module")
def hh_records(tmp_path_factory) -> Path:
    from tests.fixtures.tokenizer_files import hh_lines

    path = tmp_path_factory.mktemp("hh") / "hh40.jsonl"
    path.write_text("\n".join(hh_lines(40)) + "\n")
    return path


def test_bench_packing_plot_draws_the_json_figures(tmp_path, hh_records, sp_path, capsys):
    from megatron_prefpack.data.bench import packing_figure

    chart = tmp_path / "packing.png"
    args = ["bench", "packing", "--data", str(hh_records), "--tokenizer", str(sp_path), "--seq-len", "512"]
    assert main([*args, "--json", "--plot", str(chart)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout stays pure JSON; the chart is named on stderr
    assert f"chart: {chart}" in captured.err
    check_png(chart)
    layouts = result["layouts"]
    assert list(layouts) == ["prefpack", "duplicated", "unpacked", "unpacked_sorted"]

    def unp(key: str) -> dict[str, list[str]]:
        return {n: [f"{e[key]:.3f}x unp"] for n, e in layouts.items()}

    rows = {n: [f"{e['rows'] / layouts['unpacked']['rows']:.3f}x unp"] for n, e in layouts.items()}
    check_bars(
        packing_figure(result),
        layouts,
        {
            "rows of 512": ("rows", 1),
            "padding (%)": ("padding_fraction", 100),
            "computed tokens per group": ("tokens_per_group", 1),
            "real tokens per group": ("real_tokens_per_group", 1),
            "attention pairs per group": ("attention_pairs_per_group", 1),
        },
        {
            "rows of 512": rows,
            "computed tokens per group": unp("tokens_ratio_vs_unpacked"),
            "real tokens per group": unp("real_tokens_ratio_vs_unpacked"),
            "attention pairs per group": unp("attention_pairs_ratio_vs_unpacked"),
        },
    )


STEP_COLUMNS = {
    "rows of 64": ("rows", 1),
    "seconds per pass (fwd + bwd)": ("seconds_per_pass", 1),
    "computed tokens": ("computed_tokens", 1),
    "groups per second": ("groups_per_s", 1),
}


def step_ratios(layouts: dict) -> dict[str, dict[str, list[str]]]:
    """The notes a bench step chart must carry: the JSON's own time and token ratios, and the
    other columns divided by the unpacked and duplicated layouts' values."""

    def own(kind: str) -> dict[str, list[str]]:
        return {
            n: [f"{e[f'{kind}_ratio_vs_unpacked']:.3f}x unp", f"{e[f'{kind}_ratio_vs_duplicated']:.3f}x dup"]
            for n, e in layouts.items()
        }

    def divided(key: str) -> dict[str, list[str]]:
        unp, dup = layouts["unpacked"][key], layouts["duplicated"][key]
        return {n: [f"{e[key] / unp:.3f}x unp", f"{e[key] / dup:.3f}x dup"] for n, e in layouts.items()}

    notes = {
        "rows of 64": divided("rows"),
        "seconds per pass (fwd + bwd)": own("time"),
        "computed tokens": own("tokens"),
        "groups per second": divided("groups_per_s"),
    }
    if layouts["unpacked"]["peak_memory_bytes"] is not None:
        notes["peak memory (GiB)"] = divided("peak_memory_bytes")
    return notes


def test_bench_step_chart_of_a_result_with_peak_memory():
    """The CUDA case on any machine: a result as the command builds it, peak memory included."""
    from megatron_prefpack.training.bench_step import _add_ratios, step_figure

    layouts = {
        name: {"rows": rows, "computed_tokens": rows * 64, "seconds_per_pass": s, "peak_memory_bytes": mem}
        for name, rows, s, mem in [
            ("prefpack", 3, 0.5, 3 * 2**30),
            ("duplicated", 5, 0.8, 4 * 2**30),
            ("unpacked", 16, 2.0, 9 * 2**30),
        ]
    }
    _add_ratios(layouts, groups=8)
    result = {"model": "tiny", "device": "cuda:0", "dtype": "bfloat16", "seq_len": 64, "groups": 8}
    figure = step_figure({**result, "layouts": layouts})
    columns = {**STEP_COLUMNS, "peak memory (GiB)": ("peak_memory_bytes", 2.0**-30)}
    check_bars(figure, layouts, columns, step_ratios(layouts))
    assert bar_panels(figure)["peak memory (GiB)"][1] == [3.0, 4.0, 9.0]


@pytest.mark.slow
def test_bench_step_plot_draws_the_json_figures(tmp_path, capsys):
    import torch

    from megatron_prefpack.training.bench_step import step_figure
    from tests.test_train import make_dataset

    data = make_dataset(tmp_path / "ds", num_groups=8)
    chart = tmp_path / "step.png"
    args = ["bench", "step", "--data", str(data), "--preset", "tiny-moe", "--seq-len", "64", "--repeats", "1"]
    assert main([*args, "--micro-batch-size", "2", "--json", "--plot", str(chart)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert f"chart: {chart}" in captured.err
    check_png(chart)
    layouts = result["layouts"]
    columns = dict(STEP_COLUMNS)
    if torch.cuda.is_available():
        columns["peak memory (GiB)"] = ("peak_memory_bytes", 2.0**-30)
    check_bars(step_figure(result), layouts, columns, step_ratios(layouts))


def test_bench_plot_into_a_missing_directory_is_refused(tmp_path, hh_records, sp_path, capsys):
    args = ["bench", "packing", "--data", str(hh_records), "--tokenizer", str(sp_path), "--seq-len", "512"]
    assert main([*args, "--plot", str(tmp_path / "nope" / "p.png")]) == 2
    assert f"directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def prefpack_train(run_dir: Path, data: Path, *extra: str) -> None:
    """``prefpack train`` in a fresh process, as a user runs it."""
    from tests.test_train import overrides

    config = run_dir.parent / "empty.yaml"
    config.write_text("# everything comes from the command line\n")
    args = [sys.executable, "-m", "megatron_prefpack.cli", "train", "--config", str(config)]
    args += overrides(data, run_dir, "data.eval_fraction=0.25", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_report_of_real_training_runs(tmp_path, capsys):
    """DPO for 2 steps; SFT for 2 steps, resumed to 3 (the resumed run evaluates step 2 again)."""
    import torch

    from tests.test_train import SFT, make_dataset

    data = make_dataset(tmp_path / "ds")
    dpo = tmp_path / "dpo"
    prefpack_train(dpo, data, "run.train_steps=2")
    plotted = check_charts_follow_the_file(dpo / "metrics.jsonl")
    gpu_only = set() if torch.cuda.is_available() else {"memory"}
    assert set(plotted) == set(CHART_METRICS) - gpu_only
    assert plotted["rewards"] == {(m, s) for m in CHART_METRICS["rewards"] for s in ("train", "eval")}
    assert main(["report", str(dpo)]) == 0
    for name in plotted:
        check_png(dpo / "report" / f"{name}.png")

    sft = tmp_path / "sft"
    prefpack_train(sft, data, *SFT, "run.train_steps=2")
    prefpack_train(sft, data, *SFT, "run.train_steps=3")
    records = last_records(sft / "metrics.jsonl")
    assert sorted(records) == [
        ("eval", 0),
        ("eval", 2),
        ("eval", 3),
        ("train", 1),
        ("train", 2),
        ("train", 3),
    ]
    plotted = check_charts_follow_the_file(sft / "metrics.jsonl")
    assert set(plotted) == {"loss", "learning_rate", "throughput", "grad_norm"} | ({"memory"} - gpu_only)
    assert main(["report", str(sft)]) == 0
    assert "repeating an earlier (split, step), as a resumed run appends them: 1" in capsys.readouterr().out
    assert not (sft / "report" / "rewards.png").exists() and (sft / "report" / "loss.png").is_file()
