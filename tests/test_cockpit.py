"""What a run shows while it trains (``training/metrics.py``) and the best-k checkpoints.

- Megatron-LM's console line: exact text for hand-made steps (interval means over the steps
  that applied an update, skipped and NaN steps counted), and, in a real run, every stdout line
  is a Megatron iteration line, a validation block or a ``[prefpack]`` note, with the interval's
  mean losses, learning rate and grad norm of ``metrics.jsonl``;
- the progress bar: ``auto`` follows the terminal; forced on, tqdm writes to stderr only and
  stdout keeps whole lines; off by default in a run without a terminal;
- GPU memory: read from ``torch.cuda`` on a CUDA device only (monkeypatched), absent on CPU,
  present in a real CUDA run (GPU test);
- Weights & Biases (offline, through ``WANDB_MODE``/``WANDB_DIR``): the run's ``.wandb`` log,
  read back record by record, holds exactly the records of ``metrics.jsonl`` under
  ``train/``/``eval/`` and the run config; a resumed run continues the same W&B run id;
- config errors name their key (W&B keys without a project, wandb missing, keep_best without
  held-out data, a metric without a direction or unknown to the objective);
- best-k: pruning keeps the newest ``keep`` and the best ``keep_best`` by the evaluation each
  checkpoint records, also after a crash before any filesystem mutation of a save; a real run
  evaluated every step, restarted halfway, keeps exactly the checkpoints that its
  ``metrics.jsonl`` ranks best plus the newest, and resumes from the newest.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from megatron_prefpack.training import checkpoint, metrics
from megatron_prefpack.training.checkpoint import BestPolicy
from megatron_prefpack.training.config import ConfigError, load_config
from megatron_prefpack.training.metrics import (
    StepLog,
    _Interval,
    megatron_line,
    memory_metrics,
    progress_bar_enabled,
    validation_block,
)
from tests.distributed import run_distributed
from tests.test_checkpoint import _build, _state, crashing_before
from tests.test_train import SFT, _train, make_dataset, overrides

MEGATRON_LINE = re.compile(
    r"^ \[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] iteration +(?P<step>\d+)/ +(?P<total>\d+) \|"
    r" consumed samples: +(?P<consumed>\d+) \|"
    r" elapsed time per iteration \(ms\): (?P<ms>\d+\.\d) \|"
    r" throughput per GPU \(TFLOP/s/GPU\): \d+\.\d \|"
    r" learning rate: (?P<lr>\d\.\d{6}E[+-]\d\d) \|"
    r" global batch size: +(?P<gbs>\d+) \|"
    r"(?P<losses>( [^|:]+: -?(\d\.\d{6}E[+-]\d\d|NAN) \|)+)"
    r"( grad norm: (?P<grad_norm>\d+\.\d{3}) \|)?"
    r"( mem/[a-z_]+: \d+\.\d\d \|)*"
    r" number of skipped iterations: +(?P<skipped>\d+) \|"
    r" number of nan iterations: +(?P<nan>\d+) \|$"
)
VALIDATION_LINE = re.compile(r"^ validation loss at iteration (?P<step>\d+) \| ([^|]+ value: [^|]+ \| )+$")


def _step(step: int, **changes: Any) -> StepLog:
    base = StepLog(
        step=step,
        consumed_rows=4 * step,
        losses={"loss": 0.5, "moe/load_balancing_loss": 1.25},
        lr=1e-4,
        grad_norm=2.0,
        seconds=0.5,
        tokens=100,
        groups=10,
        flops=2e12,
        devices=2,
        skipped=False,
        nonfinite=False,
        nonfinite_steps=0,
    )
    return dataclasses.replace(base, **changes)


# ----------------------------------------------------------------------------- console


def test_megatron_line_averages_the_interval_as_megatron_does():
    """Losses over the steps that applied an update; time and FLOPs over all steps; lr and grad
    norm of the last step (none reported for a skipped one); skipped and NaN steps counted."""
    interval = _Interval()
    interval.add(_step(9))
    last = _step(
        10,
        losses={"loss": float("nan"), "moe/load_balancing_loss": float("nan")},
        grad_norm=None,
        seconds=1.5,
        skipped=True,
        nonfinite=True,
        nonfinite_steps=1,
        memory={"mem/max_allocated_gib": 1.5, "mem/max_reserved_gib": 2.0},
    )
    interval.add(last)
    line = megatron_line(
        last, interval, train_steps=100, global_batch_size=4, now=datetime(2026, 1, 2, 3, 4, 5)
    )
    assert line == (
        " [2026-01-02 03:04:05] iteration       10/     100 | consumed samples:           40 |"
        " elapsed time per iteration (ms): 1000.0 | throughput per GPU (TFLOP/s/GPU): 1.0 |"
        " learning rate: 1.000000E-04 | global batch size:     4 | loss: 5.000000E-01 |"
        " moe/load_balancing_loss: 1.250000E+00 | mem/max_allocated_gib: 1.50 |"
        " mem/max_reserved_gib: 2.00 | number of skipped iterations:   1 |"
        " number of nan iterations:   1 |"
    )
    assert MEGATRON_LINE.match(line)
    only_skipped = _Interval()
    only_skipped.add(last)
    assert " loss: NAN |" in megatron_line(last, only_skipped, 100, 4)


def test_validation_block_is_megatrons():
    block = validation_block(7, {"loss": 0.25, "count": 12})
    rule, line, closing = block.split("\n")
    assert line == " validation loss at iteration 7 | loss value: 2.500000E-01 | count value: 12 | "
    assert rule == closing == "-" * (len(line) + 1)
    assert VALIDATION_LINE.match(line)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_auto_is_on_only_on_a_terminal():
    assert not progress_bar_enabled("auto", io.StringIO())
    assert progress_bar_enabled("auto", _Terminal())
    assert progress_bar_enabled(True, io.StringIO())
    assert not progress_bar_enabled(False, _Terminal())


def test_memory_metrics_read_torch_cuda_on_a_cuda_device_only(monkeypatch):
    calls = []

    def peak(value: int):
        def read(device: Any = None) -> int:
            calls.append(device)
            return value

        return read

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", peak(3 * 2**30))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", peak(5 * 2**29))
    monkeypatch.setattr(metrics.dist, "is_initialized", lambda: False)
    assert memory_metrics(torch.device("cpu")) == {}
    assert calls == []
    cuda = torch.device("cuda", 0)
    assert memory_metrics(cuda) == {"mem/max_allocated_gib": 3.0, "mem/max_reserved_gib": 2.5}
    assert calls == [cuda, cuda]


# ----------------------------------------------------------------------------- config


@pytest.fixture
def base_args(tmp_path: Path) -> list[str]:
    (tmp_path / "ds").mkdir()
    return [f"data.path={tmp_path / 'ds'}", "model.preset=tiny-moe", "objective.type=sft"]


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        (["run.wandb_mode=offline"], "run.wandb_mode", "set run.wandb_project too"),
        (["run.wandb_project= "], "run.wandb_project", "must name a W&B project"),
        (["checkpoint.keep_best=2"], "checkpoint.keep_best", "data.eval_fraction > 0"),
        (
            ["checkpoint.keep_best=2", "data.eval_fraction=0.1", "checkpoint.best_metric=rewards/accuracies"],
            "checkpoint.best_mode",
            "'min') or higher ('max') 'rewards/accuracies'",
        ),
        (["run.progress_bar=sometimes"], "run.progress_bar", "expected bool | 'auto'"),
        (["checkpoint.keep_best=-1"], "checkpoint.keep_best", "must be >= 0"),
    ],
)
def test_logging_and_best_k_config_errors_name_the_key(base_args, extra, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base_args, *extra])
    message = str(err.value)
    assert f": {key}: " in message and words in message, message


def test_wandb_without_the_package_is_an_error_naming_the_key(base_args, monkeypatch):
    from megatron_prefpack.platform import features

    real = features.installed
    monkeypatch.setattr(features, "installed", lambda name: name != "wandb" and real(name))
    with pytest.raises(ConfigError, match=r"run\.wandb_project: .*needs wandb"):
        load_config(None, [*base_args, "run.wandb_project=p"])


def test_progress_bar_and_best_k_settings_parse(base_args):
    cfg = load_config(
        None,
        [
            *base_args,
            "run.progress_bar=true",
            "data.eval_fraction=0.1",
            "checkpoint.keep_best=3",
            "checkpoint.best_metric=loss",
        ],
    )
    assert cfg.run.progress_bar is True and cfg.run.wandb_project is None
    assert load_config(None, base_args).run.progress_bar == "auto"
    from megatron_prefpack.training.train import _best_policy

    assert _best_policy(cfg, ["count", "loss"]) == BestPolicy(3, "loss", "min")
    other = dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, best_metric="rewards/margins", best_mode="max")
    )
    with pytest.raises(ConfigError, match=r"checkpoint\.best_metric: 'rewards/margins' is not a held-out"):
        _best_policy(other, ["count", "loss"])


# ----------------------------------------------------------------------------- best-k pruning


@pytest.fixture
def tiny(megatron_single_process) -> tuple[list[torch.nn.Module], Any]:
    return _build()


def _save_evaluated(save_dir: Path, step: int, value: float | None, tiny: Any, policy: BestPolicy) -> Path:
    model, optimizer = tiny
    state = dataclasses.replace(_state(step), eval=None if value is None else {"loss": value, "count": 8})
    return checkpoint.save(save_dir, state, model, optimizer, keep=1, best=policy)


def _left(save_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in save_dir.glob("iter_*"))


@pytest.mark.parametrize(("mode", "kept"), [("min", [2, 4, 6]), ("max", [3, 6])])
def test_pruning_keeps_the_newest_and_the_best_by_the_recorded_evaluation(mode, kept, tiny, tmp_path):
    policy = BestPolicy(2, "loss", mode)
    values = {1: 0.5, 2: 0.3, 3: 0.9, 4: 0.4, 5: None, 6: 0.8}  # step 5 saved without an evaluation
    for step, value in values.items():
        _save_evaluated(tmp_path, step, value, tiny, policy)
    assert _left(tmp_path) == kept
    ranked = sorted((v, -s) for s, v in values.items() if v is not None)
    best = [-s for _, s in (ranked if mode == "min" else ranked[::-1])[:2]]
    listing = json.loads((tmp_path / checkpoint.BEST).read_text())
    assert listing["metric"] == "loss" and listing["mode"] == mode
    assert [(b["step"], b["value"]) for b in listing["best"]] == [(s, values[s]) for s in best]
    assert checkpoint.find_resume(tmp_path).path.name == "iter_0000006"


def test_a_crash_at_any_point_of_a_save_keeps_the_best(tiny, monkeypatch, tmp_path):
    """Before each filesystem mutation of a save (new checkpoint, best.json, pruning) the process
    dies; the best checkpoint so far survives, and the requeued job's save ends with the best
    and the newest, listed again in best.json."""
    policy = BestPolicy(1, "loss", "min")
    base = tmp_path / "base"
    for step, value in {1: 0.2, 2: 0.9, 3: 0.5}.items():
        _save_evaluated(base, step, value, tiny, policy)
    assert _left(base) == [1, 3]
    crash_points = 0
    while True:
        save_dir = tmp_path / f"crash{crash_points}"
        shutil.copytree(base, save_dir)
        crashed = crashing_before(
            crash_points + 1, monkeypatch, _save_evaluated, save_dir, 4, 0.7, tiny, policy
        )
        assert (save_dir / "iter_0000001" / checkpoint.MANIFEST).is_file(), crash_points
        assert checkpoint.best_checkpoints(save_dir, policy)[0][0].name == "iter_0000001"
        _save_evaluated(save_dir, 4, 0.7, tiny, policy)
        assert _left(save_dir) == [1, 4], crash_points
        assert [b["step"] for b in json.loads((save_dir / checkpoint.BEST).read_text())["best"]] == [1]
        if not crashed:
            break
        crash_points += 1
    assert crash_points >= 12  # the save's own mutations, best.json's two, the pruning's


def test_a_checkpoint_written_before_evaluations_were_recorded_still_loads(tiny, tmp_path):
    path = _save_evaluated(tmp_path, 1, None, tiny, BestPolicy(1, "loss", "min"))
    meta = json.loads((path / checkpoint.META).read_text())
    del meta["eval"]
    (path / checkpoint.META).write_text(json.dumps(meta))
    assert checkpoint.read_state(path).eval is None


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


def _cli(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    config = tmp_path / "empty.yaml"
    config.write_text("# everything comes from the command line\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "megatron_prefpack.cli", "train", "--config", str(config), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl``, the non-finite strings read back as floats."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in record.items()})
    return out


@pytest.mark.slow
def test_console_lines_follow_megatron_and_a_forced_progress_bar_stays_on_stderr(dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(
        dataset,
        run_dir,
        *SFT,
        "run.train_steps=4",
        "run.log_interval=2",
        "data.eval_fraction=0.2",
        "run.progress_bar=true",
    )
    done = _cli(tmp_path, args)
    train = [r for r in _records(run_dir) if r["split"] == "train"]
    evals = [r for r in _records(run_dir) if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 4]
    assert not any(key.startswith("mem/") for key in train[0])  # a CPU run has no GPU memory
    iterations, validations = [], []
    for line in done.stdout.splitlines():
        assert "\r" not in line, line
        if (match := MEGATRON_LINE.match(line)) is not None:
            iterations.append(match)
        elif (match := VALIDATION_LINE.match(line)) is not None:
            validations.append(int(match["step"]))
        else:
            assert line.startswith("[prefpack] ") or re.fullmatch("-+", line), line
    assert validations == [0, 4]
    assert [int(m["step"]) for m in iterations] == [2, 4]
    for match, steps in zip(iterations, ([1, 2], [3, 4]), strict=True):
        last = train[steps[-1] - 1]
        assert int(match["total"]) == 4 and int(match["gbs"]) == 4
        assert int(match["consumed"]) == 4 * steps[-1]
        assert match["lr"] == f"{last['lr']:.6E}" and match["grad_norm"] == f"{last['grad_norm']:.3f}"
        assert (int(match["skipped"]), int(match["nan"])) == (0, 0)
        for key in ("loss", "moe/load_balancing_loss"):
            mean = sum(train[s - 1][key] for s in steps) / len(steps)
            assert f" {key}: {mean:.6E} |" in match["losses"]
        assert float(match["ms"]) == pytest.approx(
            1000 * sum(train[s - 1]["step_s"] for s in steps) / 2, abs=0.06
        )
    bar = done.stderr.replace("\r", "\n")
    assert re.search(r"train: 100%\|.*\| 4/4 \[", bar), done.stderr[-2000:]
    assert "loss=" in bar and "iteration" not in done.stderr


def _wandb_log(path: Path) -> list[Any]:
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``,
    magic, version), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte
    header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last), a block's tail shorter
    than a header zero-filled. (wandb 0.31 ships no Python reader for it.)"""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, parts, pos, block = [], [], 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero fill to the end of the block
            pos += block - pos % block
            continue
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _train_with_env(args: list[str], env: dict[str, str]) -> dict:
    os.environ.update(env)  # as a launcher would set them: wandb reads them itself
    return _train(args)


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_jsonl_and_a_resume_continues_it(dataset, tmp_path):
    pytest.importorskip("wandb")
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    common = [*SFT, "data.eval_fraction=0.2", "run.wandb_project=prefpack-ci", "run.wandb_name=cockpit"]
    run_distributed(
        _train_with_env, 1, overrides(dataset, run_dir, *common, "run.train_steps=2"), env, timeout=240
    )
    run_id = (run_dir / metrics.WANDB_ID_FILE).read_text().strip()
    run_distributed(
        _train_with_env, 1, overrides(dataset, run_dir, *common, "run.train_steps=3"), env, timeout=240
    )
    assert (run_dir / metrics.WANDB_ID_FILE).read_text().strip() == run_id
    logs = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert [p.name for p in logs] == [f"run-{run_id}.wandb"] * 2  # the resumed run is the same W&B run

    logged, configs = [], []
    for log in logs:
        for record in _wandb_log(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert (record.run.run_id, record.run.project, record.run.display_name) == (
                    run_id,
                    "prefpack-ci",
                    "cockpit",
                )
                configs.append(
                    {u.key: json.loads(u.value_json) for u in record.run.config.update if u.key != "_wandb"}
                )
            elif kind == "history":
                row = {_item_key(i): json.loads(i.value_json) for i in record.history.item}
                row = {k: v for k, v in row.items() if not k.startswith("_")}
                step = row.pop(metrics.WANDB_STEP)
                (split,) = {k.split("/", 1)[0] for k in row}
                logged.append(
                    {"split": split, "step": step, **{k.split("/", 1)[1]: v for k, v in row.items()}}
                )
    expected = [{k: v for k, v in r.items() if k != "time"} for r in _records(run_dir)]
    assert [(r["split"], r["step"]) for r in expected] == [
        ("eval", 0),
        ("train", 1),
        ("train", 2),
        ("eval", 2),
        ("eval", 2),  # the resumed run evaluates its starting point
        ("train", 3),
        ("eval", 3),
    ]
    assert len(logged) == len(expected)
    for got, want in zip(logged, expected, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == value or (math.isnan(got[key]) and math.isnan(value)), (key, got, want)
    assert configs[-1] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [c["run"]["train_steps"] for c in configs] == [2, 3]


@pytest.mark.slow
def test_best_k_run_keeps_the_best_evaluated_and_the_newest_across_a_restart(dataset, tmp_path):
    """Evaluated (and so saved) every step, ``keep: 1``, ``keep_best: 2`` by the highest held-out
    loss (a ranking the decreasing loss makes differ from the newest); 3 steps, then the same
    job resubmitted for 6. The default progress bar stays off (stderr is a pipe)."""
    run_dir = tmp_path / "run"
    common = [
        *SFT,
        "data.eval_fraction=0.2",
        "run.eval_interval=1",
        "checkpoint.keep=1",
        "checkpoint.keep_best=2",
        "checkpoint.best_mode=max",
    ]
    first = _cli(tmp_path, overrides(dataset, run_dir, *common, "run.train_steps=3"))
    assert "%|" not in first.stderr
    _cli(tmp_path, overrides(dataset, run_dir, *common, "run.train_steps=6"))
    records = _records(run_dir)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # resumed at 3
    held_out = {r["step"]: r["loss"] for r in records if r["split"] == "eval" and r["step"] > 0}
    best = sorted(held_out, key=lambda s: (-held_out[s], -s))[:2]
    assert set(best) - {6}, "the ranking must keep something the newest-keep rule would not"
    save_dir = run_dir / "checkpoints"
    assert _left(save_dir) == sorted({*best, 6})
    listing = json.loads((save_dir / checkpoint.BEST).read_text())
    assert [(b["step"], b["value"]) for b in listing["best"]] == [(s, held_out[s]) for s in best]
    for step in _left(save_dir):
        state = checkpoint.read_state(save_dir / f"iter_{step:07d}")
        assert state.eval["loss"] == held_out[step]
    assert checkpoint.find_resume(save_dir).path.name == "iter_0000006"


def _train_on_cuda(args: list[str]) -> list[dict[str, Any]]:
    _train(args)
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("run.dir=")))
    return [r for r in _records(run_dir) if r["split"] == "train"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_logs_its_peak_memory(dataset, tmp_path):
    train = run_distributed(
        _train_on_cuda, 1, overrides(dataset, tmp_path, *SFT, "run.train_steps=2"), timeout=300
    )[0]
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    for record in train:
        assert 0 < record["mem/max_allocated_gib"] <= record["mem/max_reserved_gib"] <= total
