"""The GPU check's stages, each a subprocess with its own time limit, and the report.

Called by ``tools/gpu_check.sh`` (which picks the Python); see its header for what each stage
does. Standard library only: the report is written whatever the environment lacks. Every stage
ends in one of

* ``ok``: it ran and passed its checks;
* ``failed``: it ran and failed (non-zero exit, a failed check), ``reason`` says how;
* ``timeout``: it was stopped at its time limit (SIGTERM to its process group, SIGKILL 10 s
  later); whatever it had written is still read;
* ``skipped``: it did not run, ``reason`` says why (``--dry-run``, no CUDA, a missing package or
  input, no time left in ``--budget``).

A stage's time limit is what is left of ``--budget`` after the budgets of the stages still to
come are set aside: at least its own budget, more when earlier stages finished early, and the
whole check cannot overrun ``--budget``. Exit status: 1 when a stage failed or timed out, else 2
when the environment lacks what the stages need (torch, CUDA, megatron-core), else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HH_DATA = REPO / "examples" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
TRAIN_CONFIG = Path(__file__).resolve().parent / "dpo.yaml"
KILL_GRACE_S = 10.0
GiB = 2**30


@dataclass(frozen=True)
class Scale:
    """Sizes of one mode: the GPU check or its CPU ``--dry-run``."""

    budget_s: float
    """Default ``--budget``: the whole check's wall-clock limit."""
    stage_s: dict[str, float]
    """Each stage's own budget (0: the stage does not run in this mode)."""
    tokenizer_vocab: int
    preprocess: str
    """Arguments of ``prefpack preprocess`` (here and below: split at spaces)."""
    attention: dict[str, str]
    """``bench_attention.py`` arguments per shape (one process per shape: a shape that runs out
    of time keeps the other's results)."""
    bench_step: str
    train_overrides: list[str]
    plan_gpu: str = "h200-141gb"


GPU = Scale(
    budget_s=465,
    stage_s={"data": 25, "gpu_tests": 75, "bench_attention": 80, "bench_step": 80, "train": 150, "plan": 20},
    tokenizer_vocab=8000,
    # groups of at most 384 + 2 x 257 tokens: every group fits the train stage's rows of 2048
    preprocess="--max-prompt-len 384 --max-response-len 256 --seq-len 2048 --workers 8",
    attention={
        "gqa": "--seq-len 8192 --shapes gqa --warmup 2 --iters 5",
        "mla": "--seq-len 8192 --shapes mla --warmup 2 --iters 5",
    },
    bench_step=(
        "--preset bench-moe-1b --dtype bfloat16 --seq-len 1024 --groups 96 --micro-batch-size 4 --repeats 2"
    ),
    train_overrides=[],
)

DRY_RUN = Scale(
    # about 40 s on a quiet 2-core machine; the limits leave room for a busy one
    budget_s=240,
    stage_s={"data": 40, "gpu_tests": 0, "bench_attention": 30, "bench_step": 40, "train": 60, "plan": 30},
    tokenizer_vocab=500,
    preprocess="--max-prompt-len 48 --max-response-len 32 --seq-len 128 --workers 1",
    attention={
        "gqa": "--device cpu --seq-len 256 --check-len 128 --rows 1 --shapes gqa --warmup 0 --iters 1"
    },
    bench_step=(
        "--preset tiny-moe --dtype float32 --seq-len 128 --groups 8 --micro-batch-size 4 --repeats 1"
    ),
    train_overrides=[
        "model.preset=tiny-moe",
        "run.train_steps=3",
        "run.eval_batches=1",
        "data.seq_len=128",
        "data.global_batch_size=4",
        "optimizer.lr=1e-3",
        "optimizer.warmup_steps=0",
    ],
)

STAGES = ("data", "gpu_tests", "bench_attention", "bench_step", "train", "plan")


# ----------------------------------------------------------------------------- running stages


@dataclass
class Stage:
    """One stage's entry in the report."""

    status: str = "skipped"
    reason: str | None = None
    seconds: float = 0.0
    timeout_s: float | None = None
    logs: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    def fail(self, status: str, reason: str) -> None:
        """Record the first failure (a later one does not hide it)."""
        if self.status in ("ok", "skipped"):
            self.status, self.reason = status, reason


@dataclass
class Proc:
    rc: int | None
    """Exit status; None when stopped at the time limit."""
    seconds: float
    log: Path

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Checker:
    """Runs the stages under one deadline and collects the report."""

    def __init__(self, args: argparse.Namespace, scale: Scale) -> None:
        self.args = args
        self.scale = scale
        self.out: Path = args.out.resolve()
        self.start = time.monotonic()
        self.deadline = self.start + (args.budget or scale.budget_s)
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHONWARNINGS": "ignore",  # Megatron warns at length about missing TE/apex
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.stages: dict[str, Stage] = {name: Stage() for name in STAGES}
        self.environment: dict[str, Any] = {}

    # -- processes

    def python(self, *args: str | Path) -> list[str]:
        return [self.args.python, *map(str, args)]

    def prefpack(self, *args: str | Path) -> list[str]:
        return self.python("-m", "megatron_prefpack.cli", *args)

    def left_s(self) -> float:
        return self.deadline - time.monotonic() - KILL_GRACE_S

    def limit_for(self, stage: Stage, name: str) -> float | None:
        """This stage's time limit now: what is left of the budget once the later stages' own
        budgets are set aside; None (and the stage skipped) when under 5 s are left."""
        later = STAGES[STAGES.index(name) + 1 :]
        limit = self.left_s() - sum(self.scale.stage_s[n] for n in later)
        if limit < 5:
            stage.status, stage.reason = "skipped", f"no time left in the --budget of {self.budget_s:.0f} s"
            return None
        stage.timeout_s = round(limit, 1)
        return limit

    @property
    def budget_s(self) -> float:
        return self.args.budget or self.scale.budget_s

    def run(self, stage: Stage, label: str, cmd: list[str], until: float) -> Proc:
        """Run ``cmd`` (own process group, output to ``logs/<label>.log``) until the monotonic
        time ``until``; then SIGTERM the group, and SIGKILL it ``KILL_GRACE_S`` later."""
        log = self.out / "logs" / f"{label}.log"
        stage.logs.append(str(log.relative_to(self.out)))
        start = time.monotonic()
        with log.open("w") as sink:
            sink.write("$ " + " ".join(cmd) + "\n")
            sink.flush()
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc: int | None = proc.wait(timeout=max(until - start, 0.1))
            except subprocess.TimeoutExpired:
                rc = None
                _stop_group(proc)
        return Proc(rc, time.monotonic() - start, log)

    def run_json(self, stage: Stage, label: str, cmd: list[str], until: float) -> tuple[Proc, Any]:
        """``run`` a command that prints one JSON object last; (proc, the object or None)."""
        proc = self.run(stage, label, cmd, until)
        return proc, _last_json(proc.log)

    # -- the stages

    def check(self) -> int:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.environment = self.probe()
        for name in STAGES:
            stage = self.stages[name]
            started = time.monotonic()
            reason = self.cannot_run(name)
            if reason:
                stage.reason = reason
            elif (limit := self.limit_for(stage, name)) is not None:
                try:
                    getattr(self, f"stage_{name}")(stage, time.monotonic() + limit)
                except Exception as err:  # a bug here must not lose the rest of the report
                    stage.fail("failed", f"gpu_check itself failed: {type(err).__name__}: {err}")
            stage.seconds = round(time.monotonic() - started, 1)
            print(
                f"[gpu_check] {name}: {stage.status}" + (f" ({stage.reason})" if stage.reason else ""),
                flush=True,
            )
        report = self.report()
        (self.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (self.out / "report.md").write_text(markdown(report))
        print(f"[gpu_check] report: {self.out / 'report.json'}, {self.out / 'report.md'}", flush=True)
        if report["summary"]["failed"]:
            return 1
        return 0 if report["summary"]["environment_ok"] else 2

    def probe(self) -> dict[str, Any]:
        """The environment (``probe.py`` in the chosen Python), with megatron-core taken from a
        carried copy when the Python lacks it."""
        info = self._probe()
        if info.get("megatron_core") is None and info.get("torch") is not None:
            carried = carried_megatron()
            if carried is not None:
                shim = self.out / "mcore_path"
                shim.mkdir(parents=True, exist_ok=True)
                link = shim / "megatron"
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(carried, target_is_directory=True)
                self.env["PYTHONPATH"] = os.pathsep.join([self.env["PYTHONPATH"], str(shim)])
                info = self._probe()
                info["megatron_core_note"] = (
                    f"not installed in {self.args.python}; using the copy at {carried}"
                )
        if info.get("megatron_core") is None:
            info.setdefault(
                "megatron_core_note",
                f"megatron-core is NOT importable in {self.args.python}: only the data stage can run. "
                "Install it, set PYTHON= to an environment that has it, or carry a copy of its source "
                "(MCORE_SRC=<dir holding megatron/>, or .venv/lib/python3.*/site-packages/megatron)",
            )
        return info

    def _probe(self) -> dict[str, Any]:
        label = "probe"
        log = self.out / "logs" / f"{label}.log"
        try:
            done = subprocess.run(
                self.python(Path(__file__).with_name("probe.py")),
                cwd=REPO,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            return {"python": self.args.python, "error": "the environment probe took over 60 s"}
        log.write_text(done.stdout + done.stderr)
        try:
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"python": self.args.python, "error": f"probe failed: {done.stderr.strip()[-500:]}"}

    def cannot_run(self, name: str) -> str | None:
        """Why stage ``name`` is skipped before it starts, or None."""
        env, dry = self.environment, self.args.dry_run
        if name == "gpu_tests" and dry:
            return "--dry-run: the GPU tests need CUDA"
        if env.get("torch") is None:
            return f"torch is not importable in {self.args.python}"
        if not dry and not env.get("cuda_available"):
            return f"no CUDA device visible to {self.args.python} (torch {env.get('torch')})"
        if name != "data" and env.get("megatron_core") is None:
            return "megatron-core is not importable (see environment.megatron_core_note)"
        if name in ("bench_step", "train", "plan") and self.stages["data"].status != "ok":
            return "no dataset: stage data did not succeed"
        if name == "gpu_tests" and env.get("pytest") is None:
            return f"pytest is not installed in {self.args.python}"
        return None

    def stage_data(self, stage: Stage, until: float) -> None:
        """The bundled HH-RLHF pairs, tokenized (a SentencePiece model trained on them, as the
        CPU demo does) and preprocessed; or ``--data``, a dataset preprocessed elsewhere."""
        if self.args.data is not None:
            info = _dataset_info(self.args.data)
            if info is None:
                stage.fail(
                    "failed", f"--data {self.args.data}: no dataset.json (not a `prefpack preprocess` output)"
                )
                return
            stage.status, stage.result = "ok", {"path": str(self.args.data), "given": True, **info}
            tokenizer = _dataset_tokenizer(self.args.data)
            if tokenizer is not None:
                stage.result["tokenizer"] = str(tokenizer)
            return
        if self.environment.get("sentencepiece") is None:
            stage.fail(
                "failed",
                f"sentencepiece is not installed in {self.args.python}: preprocess the data elsewhere and "
                "pass --data DIR",
            )
            return
        tokenizer, data = self.out / "data" / "tokenizer", self.out / "data" / "hh"
        proc = self.run(
            stage,
            "data_tokenizer",
            self.prefpack(
                "train-tokenizer", "--input", HH_DATA, "--output", tokenizer,
                "--vocab-size", str(self.scale.tokenizer_vocab),
            ),
            until,
        )  # fmt: skip
        if proc.rc != 0:
            stage.fail(_status(proc), f"train-tokenizer: {_why(proc)}")
            return
        proc = self.run(
            stage,
            "data_preprocess",
            self.prefpack(
                "preprocess", "--input", HH_DATA, "--tokenizer", f"{tokenizer}.model", "--output", data,
                "--no-progress", *self.scale.preprocess.split(),
            ),
            until,
        )  # fmt: skip
        if proc.rc != 0:
            stage.fail(_status(proc), f"preprocess: {_why(proc)}")
            return
        stage.status = "ok"
        stage.result = {"path": str(data), "tokenizer": f"{tokenizer}.model", **(_dataset_info(data) or {})}

    def stage_gpu_tests(self, stage: Stage, until: float) -> None:
        """``pytest -m gpu`` over the test files that hold GPU tests."""
        files = sorted(
            str(p.relative_to(REPO))
            for p in (REPO / "tests").glob("test_*.py")
            if "mark.gpu" in p.read_text(errors="replace")
        )
        xml = self.out / "gpu_tests.xml"
        proc = self.run(
            stage,
            "gpu_tests",
            self.python(
                "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}", *files
            ),
            until,
        )
        counts = _junit_counts(xml) or _pytest_summary_counts(proc.log) or _pytest_verbose_counts(proc.log)
        stage.result = {"files": files, **(counts or {})}
        if proc.timed_out:
            stage.fail("timeout", f"stopped after {proc.seconds:.0f} s")
        elif counts is None:
            stage.fail("failed", f"no test results: {_why(proc)}")
        elif counts["failed"] or counts["errors"]:
            stage.fail("failed", f"{counts['failed']} failed, {counts['errors']} errors (see the log)")
        elif proc.rc not in (0, 5):
            stage.fail("failed", _why(proc))
        else:
            stage.status = "ok"

    def stage_bench_attention(self, stage: Stage, until: float) -> None:
        """``tools/bench_attention.py --json``, one process per shape."""
        tokenizer = self.stages["data"].result.get("tokenizer")
        shapes = list(self.scale.attention)
        stage.result = {"shapes": {}}
        for i, (shape, extra) in enumerate(self.scale.attention.items()):
            # Split what is left evenly over the shapes still to run.
            share = time.monotonic() + (until - time.monotonic()) / (len(shapes) - i)
            cmd = self.python(REPO / "tools" / "bench_attention.py", "--json", *extra.split())
            if tokenizer:
                cmd += ["--tokenizer", tokenizer]
            proc, result = self.run_json(stage, f"bench_attention_{shape}", cmd, share)
            if result is not None:
                stage.result["shapes"].update(result.pop("shapes", {}))
                stage.result.update(result)
            if proc.rc != 0 or result is None:
                stage.fail(_status(proc), f"{shape}: {_why(proc)}")
        if len(shapes) < 2:
            stage.result["note"] = f"--dry-run: the reference backend on the CPU, shape {shapes[0]} only"
        if stage.status == "skipped":
            stage.status = "ok"

    def stage_bench_step(self, stage: Stage, until: float) -> None:
        """``prefpack bench step --json``: groups/s and peak memory per row layout."""
        data = self.stages["data"].result["path"]
        proc, result = self.run_json(
            stage,
            "bench_step",
            self.prefpack("bench", "step", "--data", data, "--json", *self.scale.bench_step.split()),
            until,
        )
        if result is not None:
            stage.result = result
        if proc.rc != 0 or result is None:
            stage.fail(_status(proc), _why(proc))
        else:
            stage.status = "ok"

    def stage_train(self, stage: Stage, until: float) -> None:
        """20 DPO steps (``tools/gpu_check/dpo.yaml``) through ``train_peak.py``; judged on the
        held-out DPO loss and reward accuracy before and after. The checkpoint it saves at the
        end is deleted (the save's time is measured, the 20 GB are not kept)."""
        run_dir = self.out / "train"
        config = write_train_config(
            run_dir,
            {
                "data.path": self.stages["data"].result["path"],
                "run.dir": str(run_dir),
                "checkpoint.save": str(run_dir / "checkpoints"),
            },
            self.scale.train_overrides,
            vocab=self.stages["data"].result.get("vocab_size") if self.args.dry_run else None,
        )
        stage.result["config"] = str(config)
        peak_file = run_dir / "peak_memory.json"
        proc = self.run(
            stage,
            "train",
            self.python(Path(__file__).with_name("train_peak.py"), peak_file, "--config", config),
            until,
        )
        # The final checkpoint (about 20 GB for the 1.4 B model with its Adam state) is a by-product.
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        stage.result.update(summarize_training(run_dir / "metrics.jsonl"))
        peak = _read_json(peak_file) or {}
        stage.result["peak_memory_bytes"] = peak.get("training_peak_bytes") or peak.get("end_peak_bytes")
        stage.result["peak_memory_end_bytes"] = peak.get("end_peak_bytes")
        learned = stage.result.get("learned")
        if proc.timed_out:
            after = (
                "after the final evaluation (in the checkpoint save)"
                if stage.result.get("eval_after")
                else ""
            )
            stage.fail("timeout", f"stopped after {proc.seconds:.0f} s {after}".strip())
        elif proc.rc != 0:
            stage.fail("failed", _why(proc))
        elif learned is None:
            stage.fail("failed", "no held-out evaluation before and after training in metrics.jsonl")
        elif self.args.dry_run:
            stage.status = "ok"
            stage.result["note"] = "--dry-run: learning is reported, not judged, at toy scale"
        elif not learned:
            stage.fail("failed", "did not learn: " + stage.result["verdict"])
        else:
            stage.status = "ok"

    def stage_plan(self, stage: Stage, until: float) -> None:
        """``prefpack plan`` for the train stage's config: predicted vs measured peak memory."""
        config = self.stages["train"].result.get("config")
        if config is None:
            stage.reason = "the train stage wrote no config"
            return
        gpu = self.args.plan_gpu or plan_gpu_name(self.environment.get("gpu"), self.scale.plan_gpu)
        proc, plan = self.run_json(
            stage,
            "plan",
            self.prefpack("plan", "--config", config, "--gpus", "1", "--gpu", gpu, "--json"),
            until,
        )
        if proc.rc == 2 and "invalid choice: 'plan'" in proc.tail(5):
            stage.reason = "planner unavailable (`prefpack plan` is not a command of this checkout)"
            return
        if proc.rc != 0 or not isinstance(plan, dict):
            stage.fail(_status(proc), _why(proc))
            return
        stage.status = "ok"
        stage.result = compare_plan(plan, self.stages["train"].result, gpu)

    # -- the report

    def report(self) -> dict[str, Any]:
        stages = {name: _stage_dict(stage) for name, stage in self.stages.items()}
        failed = [n for n, s in stages.items() if s["status"] in ("failed", "timeout")]
        return {
            "mode": "dry-run" if self.args.dry_run else "gpu",
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "seconds": round(time.monotonic() - self.start, 1),
            "budget_s": self.budget_s,
            "out": str(self.out),
            "environment": self.environment,
            "stages": stages,
            "summary": {
                "ok": [n for n, s in stages.items() if s["status"] == "ok"],
                "skipped": [n for n, s in stages.items() if s["status"] == "skipped"],
                "failed": failed,
                "environment_ok": self.environment_ok(),
            },
        }

    def environment_ok(self) -> bool:
        """Whether the environment lets every stage of this mode run: torch, CUDA (unless
        ``--dry-run``) and megatron-core."""
        env = self.environment
        has_cuda = self.args.dry_run or bool(env.get("cuda_available"))
        return env.get("torch") is not None and has_cuda and env.get("megatron_core") is not None


# ----------------------------------------------------------------------------- helpers


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc``'s process group (it leads its own session), SIGKILL after the grace."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _status(proc: Proc) -> str:
    return "timeout" if proc.timed_out else "failed"


def _why(proc: Proc) -> str:
    """One line on how a process ended, with its log's last lines."""
    head = f"stopped at the time limit after {proc.seconds:.0f} s" if proc.timed_out else f"exit {proc.rc}"
    tail = proc.tail(3).replace("\n", " | ")
    return f"{head}; log {proc.log.name}: {tail}" if tail else head


def _last_json(log: Path) -> Any:
    """The last JSON object printed to ``log`` (pretty-printed or on one line), or None."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for match in reversed(list(re.finditer(r"^\{", text, re.MULTILINE))):
        try:
            return json.JSONDecoder().raw_decode(text[match.start() :])[0]
        except json.JSONDecodeError:
            continue
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _dataset_info(path: Path | str) -> dict[str, Any] | None:
    """Groups, vocabulary and truncation of a preprocessed dataset (its ``dataset.json``)."""
    info = _read_json(Path(path) / "dataset.json")
    if not isinstance(info, dict):
        return None
    summary = info.get("summary", {})
    return {
        "groups": info.get("num_groups"),
        "vocab_size": info.get("tokenizer", {}).get("vocab_size"),
        "summary": summary,
    }


def _dataset_tokenizer(path: Path) -> Path | None:
    """The tokenizer file a dataset was made with: where ``dataset.json`` says, else a file of
    that name beside the dataset directory (both copied to another machine); None if neither."""
    recorded = ((_read_json(path / "dataset.json") or {}).get("tokenizer") or {}).get("path")
    if not recorded:
        return None
    candidates = [Path(recorded), path.parent / Path(recorded).name]
    return next((c for c in candidates if c.is_file()), None)


def _junit_counts(xml: Path) -> dict[str, int] | None:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {
        "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
        "failed": total["failures"],
        "skipped": total["skipped"],
        "errors": total["errors"],
    }


def _pytest_summary_counts(log: Path) -> dict[str, int] | None:
    """Counts from pytest's last summary line (``3 passed, 1 skipped in 2.0s``)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        found = dict((word, int(n)) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", line))
        if found:
            return {
                "passed": found.get("passed", 0),
                "failed": found.get("failed", 0),
                "skipped": found.get("skipped", 0),
                "errors": found.get("error", 0) + found.get("errors", 0),
            }
    return None


def _pytest_verbose_counts(log: Path) -> dict[str, int] | None:
    """Counts from ``pytest -v``'s per-test lines (``path::test[id] PASSED``), for a session that
    ended before its summary (stopped at the time limit, a failing session hook)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    outcomes = re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text)
    if not outcomes:
        return None
    count = outcomes.count
    return {
        "passed": count("PASSED") + count("XPASS"),
        "failed": count("FAILED"),
        "skipped": count("SKIPPED") + count("XFAIL"),
        "errors": count("ERROR"),
    }


def carried_megatron() -> Path | None:
    """A megatron-core source tree to put on ``PYTHONPATH``: ``$MCORE_SRC/megatron``, else one in
    a virtual environment inside the repo (carried to the GPU machine with the working tree)."""
    if os.environ.get("MCORE_SRC"):
        candidates = [Path(os.environ["MCORE_SRC"]) / "megatron"]
    else:
        candidates = sorted(REPO.glob(".venv*/lib/python3*/site-packages/megatron"))
    return next((c.resolve() for c in candidates if (c / "core" / "__init__.py").is_file()), None)


def write_train_config(
    run_dir: Path, settings: dict[str, str], overrides: list[str], vocab: int | None
) -> Path:
    """``dpo.yaml`` with ``settings`` and the mode's ``key=value`` overrides applied (and, for
    a toy model, the dataset's vocabulary), written as ``run_dir/config.yaml``: the one file
    both ``prefpack train`` and ``prefpack plan`` read."""
    import yaml  # a dependency of megatron-prefpack; only the stages that need it import it

    config = yaml.safe_load(TRAIN_CONFIG.read_text())
    pairs = dict(settings)
    for item in overrides:
        key, _, value = item.partition("=")
        pairs[key] = yaml.safe_load(value)
    if vocab:
        pairs["model.vocab_size"] = int(vocab)
    for key, value in pairs.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize_training(metrics: Path) -> dict[str, Any]:
    """Steps, median step time and throughput (the first step, which warms up, left out when
    there are more), train loss at the start and end, held-out loss and reward accuracy before
    and after, and whether it learned: the held-out DPO loss fell, or more than half of the
    held-out pairs now rank the chosen response first."""
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return {}
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    timed = train[1:] if len(train) > 1 else train

    def finite(key: str, rows: list[dict]) -> list[float]:
        return [v for r in rows if isinstance(v := r.get(key), (int, float)) and math.isfinite(v)]

    head = max(1, min(5, len(train) // 2))
    result: dict[str, Any] = {
        "steps": len(train),
        "step_s_median": _median(finite("step_s", timed)),
        "tokens_per_s_median": _median(finite("tokens_per_s", timed)),
        "groups_per_s_median": _median(finite("groups_per_s", timed)),
        "tflops_per_device_median": _median(finite("tflops_per_device", timed)),
        "train_loss_first": _mean(finite("loss", train[:head])),
        "train_loss_last": _mean(finite("loss", train[-head:])),
        "train_loss_steps_averaged": head,
        "eval_before": None,
        "eval_after": None,
        "learned": None,
    }
    if len(evals) >= 2 and train:
        keep = ("step", "count", "loss", "rewards/accuracies", "rewards/margins")
        before, after = ({k: e.get(k) for k in keep} for e in (evals[0], evals[-1]))
        result["eval_before"], result["eval_after"] = before, after
        loss_fell = after["loss"] < before["loss"]
        accurate = after["rewards/accuracies"] > 0.5
        result["learned"] = bool(loss_fell or accurate)
        result["verdict"] = (
            f"held-out DPO loss {before['loss']:.4f} -> {after['loss']:.4f}, reward accuracy "
            f"{before['rewards/accuracies']:.1%} -> {after['rewards/accuracies']:.1%} ({after['count']} pairs)"
        )
    return result


def plan_gpu_name(device: str | None, default: str) -> str:
    """The planner's name for the GPU the probe saw (H100 or H200), else ``default``."""
    name = (device or "").upper()
    if "H100" in name:
        return "h100-80gb"
    if "H200" in name:
        return "h200-141gb"
    return default


def compare_plan(plan: dict[str, Any], train: dict[str, Any], gpu: str) -> dict[str, Any]:
    """The planner's predicted peak memory and step time next to the train stage's measured ones."""
    ranks = plan.get("ranks") or []
    predicted = max((r.get("total_bytes") or 0 for r in ranks), default=None) or None
    measured = train.get("peak_memory_bytes")
    step_s = plan.get("step_time_s")
    return {
        "gpu": gpu,
        "fits": plan.get("fits"),
        "predicted_peak_bytes": predicted,
        "measured_peak_bytes": measured,
        "measured_over_predicted": measured / predicted if measured and predicted else None,
        "predicted_activation_bytes": max((r.get("activation_bytes") or 0 for r in ranks), default=None)
        if ranks
        else plan.get("activation_bytes"),
        "predicted_step_s": step_s,
        "measured_step_s": train.get("step_s_median"),
        "plan": plan,
    }


def _stage_dict(stage: Stage) -> dict[str, Any]:
    return {
        "status": stage.status,
        "reason": stage.reason,
        "seconds": stage.seconds,
        "timeout_s": stage.timeout_s,
        "logs": stage.logs,
        "result": stage.result,
    }


# ----------------------------------------------------------------------------- Markdown


def _gib(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value / GiB:.2f}"


def _num(value: Any, fmt: str = ".3f") -> str:
    return "-" if not isinstance(value, (int, float)) else format(value, fmt)


def _count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value / 1e9:.2f} B" if value >= 1e9 else f"{value / 1e6:.2f} M"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return [*lines, *("| " + " | ".join(row) + " |" for row in rows), ""]


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: environment, one line per stage, then each stage's figures."""
    env, stages = report["environment"], report["stages"]
    out = [
        f"# GPU check ({report['mode']})",
        "",
        f"{report['finished']}; {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget; "
        f"output in `{report['out']}`.",
        "",
        "## Environment",
        "",
        *_table(
            ["item", "value"],
            [
                ["python", f"`{env.get('python')}` ({env.get('python_version')})"],
                [
                    "GPU",
                    f"{env.get('gpu') or 'none'} x {env.get('gpu_count', 0)} ({_gib(env.get('gpu_memory_bytes'))} GiB)",
                ],
                ["torch / CUDA", f"{env.get('torch')} / {env.get('cuda')}"],
                ["megatron-core", f"{env.get('megatron_core')}"],
                ["Transformer Engine", f"{env.get('transformer_engine')}"],
                ["flash-attn", f"{env.get('flash_attn')}"],
            ],
        ),
    ]
    if env.get("megatron_core_note"):
        out += [f"**megatron-core:** {env['megatron_core_note']}", ""]
    if env.get("error"):
        out += [f"**environment probe:** {env['error']}", ""]
    out += [
        "## Stages",
        "",
        *_table(
            ["stage", "status", "seconds", "limit s", "reason"],
            [
                [
                    n,
                    s["status"],
                    _num(s["seconds"], ".0f"),
                    _num(s["timeout_s"], ".0f"),
                    (s["reason"] or "").replace("|", "/"),
                ]
                for n, s in stages.items()
            ],
        ),
    ]
    out += _md_gpu_tests(stages["gpu_tests"]) + _md_attention(stages["bench_attention"])
    out += _md_bench_step(stages["bench_step"]) + _md_train(stages["train"]) + _md_plan(stages["plan"])
    return "\n".join(out) + "\n"


def _md_gpu_tests(stage: dict) -> list[str]:
    r = stage["result"]
    if "passed" not in r:
        return []
    return [
        "## GPU tests (`pytest -m gpu`)",
        "",
        f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped, {r['errors']} errors "
        f"({', '.join(r['files'])}).",
        "",
    ]


def _md_attention(stage: dict) -> list[str]:
    r = stage["result"]
    if not r.get("shapes"):
        return []
    out = [
        "## Attention kernels (`tools/bench_attention.py`)",
        "",
        f"{r.get('groups')} HH-RLHF groups in rows of {r.get('seq_len')} on {r.get('device')} (bf16); "
        "useful TFLOP/s count the prefix-shared layout's attention pairs for every layout; "
        "check = relative error vs the fp32 reference (out dq dk dv).",
        "",
    ]
    rows = []
    for shape, s in r["shapes"].items():
        for backend, b in s["backends"].items():
            check = " ".join(f"{v:.1e}" for v in (b.get("check") or {}).values()) or "-"
            if not b["layouts"]:
                rows.append(
                    [
                        shape,
                        backend,
                        check,
                        "FAILED",
                        "-",
                        "-",
                        "-",
                        "-",
                        (b.get("error") or "").replace("|", "/"),
                    ]
                )
            for layout, e in b["layouts"].items():
                rows.append(
                    [shape, backend, check, layout, str(e["rows"]), _num(e["fwd_bwd_ms"], ".2f"),
                     _num(e["useful_tflops"], ".1f"), _num(e["time_ratio_vs_prefix_shared"], ".2f"),
                     (b.get("error") or "").replace("|", "/")]
                )  # fmt: skip
    header = [
        "shape",
        "backend",
        "check",
        "layout",
        "rows",
        "fwd+bwd ms",
        "useful TFLOP/s",
        "x prefix-shared",
        "error",
    ]
    return out + _table(header, rows) + ([r["note"], ""] if r.get("note") else [])


def _md_bench_step(stage: dict) -> list[str]:
    r = stage["result"]
    if not r.get("layouts"):
        return []
    rows = [
        [layout, str(e["rows"]), _num(e["seconds_per_pass"]), _num(e["groups_per_s"], ".1f"),
         _num(e["time_ratio_vs_unpacked"]), _num(e["tokens_ratio_vs_unpacked"]),
         _num(e["time_ratio_vs_duplicated"]), _gib(e.get("peak_memory_bytes"))]
        for layout, e in r["layouts"].items()
    ]  # fmt: skip
    header = ["layout", "rows", "s/pass", "pairs/s", "time x unp", "tok x unp", "time x dup", "peak GiB"]
    return [
        "## Model step (`prefpack bench step`)",
        "",
        f"{r['model']} ({_count(r.get('parameters'))} parameters, {r.get('dtype')}) on {r['device']}: "
        f"forward + backward over {r['groups']} preference pairs (groups/s = pairs/s) in rows of {r['seq_len']}.",
        "",
        *_table(header, rows),
    ]


def _md_train(stage: dict) -> list[str]:
    r = stage["result"]
    if "steps" not in r:
        return []
    before, after = r.get("eval_before") or {}, r.get("eval_after") or {}
    rows = [
        ["steps", str(r["steps"])],
        ["step time (median) s", _num(r["step_s_median"])],
        ["tokens/s, pairs/s", f"{_num(r['tokens_per_s_median'], '.0f')}, {_num(r['groups_per_s_median'], '.1f')}"],
        ["TFLOP/s per GPU (estimate)", _num(r["tflops_per_device_median"], ".1f")],
        ["peak GPU memory GiB", _gib(r.get("peak_memory_bytes"))],
        [f"train loss (mean of first / last {r['train_loss_steps_averaged']} steps)",
         f"{_num(r['train_loss_first'], '.4f')} -> {_num(r['train_loss_last'], '.4f')}"],
        [f"held-out DPO loss ({after.get('count', '-')} pairs)", f"{_num(before.get('loss'), '.4f')} -> {_num(after.get('loss'), '.4f')}"],
        ["held-out reward accuracy", f"{_num(before.get('rewards/accuracies'), '.1%')} -> {_num(after.get('rewards/accuracies'), '.1%')}"],
        ["learned", str(r.get("learned"))],
    ]  # fmt: skip
    return [
        "## DPO training (`prefpack train`)",
        "",
        f"config `{r.get('config')}`",
        "",
        *_table(["", ""], rows),
    ] + ([r["note"], ""] if r.get("note") else [])


def _md_plan(stage: dict) -> list[str]:
    r = stage["result"]
    if "predicted_peak_bytes" not in r:
        return [] if stage["status"] != "skipped" else ["## Planner", "", stage["reason"] or "", ""]
    rows = [
        ["peak memory GiB", _gib(r["predicted_peak_bytes"]), _gib(r["measured_peak_bytes"])],
        ["step time s", _num(r["predicted_step_s"]), _num(r["measured_step_s"])],
    ]
    return [
        f"## Planner (`prefpack plan --gpu {r['gpu']}`) vs measured",
        "",
        *_table(["", "predicted", "measured"], rows),
        f"fits: {r.get('fits')}; measured / predicted peak: {_num(r.get('measured_over_predicted'), '.2f')}",
        "",
    ]


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the Python every stage runs with")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="report directory")
    parser.add_argument("--dry-run", action="store_true", help="the same pipeline on the CPU at toy scale")
    parser.add_argument("--data", type=Path, default=None, help="a preprocessed dataset to use instead")
    parser.add_argument("--budget", type=float, default=None, help="wall-clock limit of the whole check, s")
    parser.add_argument(
        "--plan-gpu", default=None, help="GPU name for `prefpack plan` (default: from the probe)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.data is not None:
        args.data = args.data.resolve()
    return Checker(args, DRY_RUN if args.dry_run else GPU).check()


if __name__ == "__main__":
    sys.exit(main())
