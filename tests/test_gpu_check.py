"""``tools/gpu_check.sh --dry-run``: the GPU check's whole pipeline on the CPU at toy scale.

Every stage either runs (and its figures land in ``report.json``) or is skipped with a stated
reason; the Markdown report carries the same. The stage helpers that judge results (training
metrics, the planner comparison, pytest counts, time limits) are tested on crafted inputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ["data", "gpu_tests", "bench_attention", "bench_step", "train", "plan"]


def _load_run_module():
    spec = importlib.util.spec_from_file_location("gpu_check_run", REPO / "tools" / "gpu_check" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_run_module()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(out), "--budget", "600"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=700,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text(), out


@pytest.mark.slow
def test_dry_run_report_structure(dry_run: tuple[dict, str, Path]) -> None:
    report, md, out = dry_run
    assert report["mode"] == "dry-run" and list(report["stages"]) == STAGES
    env = report["environment"]
    assert env["python"] == sys.executable and env["torch"] and env["megatron_core"]
    for key in ("cuda", "gpu", "transformer_engine", "flash_attn"):
        assert key in env
    for name, stage in report["stages"].items():
        assert stage["status"] in ("ok", "skipped"), (name, stage)
        if stage["status"] == "skipped":
            assert stage["reason"], name
        else:
            assert stage["timeout_s"] > 0 and stage["logs"], name
            assert all((out / log).is_file() for log in stage["logs"])
    assert report["stages"]["gpu_tests"]["status"] == "skipped"
    assert "--dry-run" in report["stages"]["gpu_tests"]["reason"]
    assert report["summary"]["failed"] == []
    assert report["seconds"] <= report["budget_s"]
    for name in STAGES:
        assert f"| {name} | {report['stages'][name]['status']} |" in md


@pytest.mark.slow
def test_dry_run_stage_results(dry_run: tuple[dict, str, Path]) -> None:
    report, md, _ = dry_run
    stages = report["stages"]
    assert stages["data"]["result"]["groups"] == 2312 and stages["data"]["result"]["vocab_size"] == 500

    attention = stages["bench_attention"]["result"]
    backend = attention["shapes"]["gqa"]["backends"]["reference"]
    assert backend["ok"] and set(backend["layouts"]) == {"prefix-shared", "duplicated", "causal"}
    assert max(backend["check"].values()) < attention["tolerance"]

    step = stages["bench_step"]["result"]
    assert step["model"] == "tiny-moe" and step["groups"] == 8
    for entry in step["layouts"].values():
        assert entry["groups_per_s"] > 0 and entry["peak_memory_bytes"] is None  # CPU: no GPU memory

    train = stages["train"]["result"]
    assert train["steps"] == 3 and train["step_s_median"] > 0
    assert train["eval_before"]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert isinstance(train["learned"], bool) and train["peak_memory_bytes"] is None
    assert not (Path(train["config"]).parent / "checkpoints").exists()

    plan = stages["plan"]
    if plan["status"] == "ok":
        assert plan["result"]["predicted_peak_bytes"] > 0 and plan["result"]["measured_peak_bytes"] is None
    else:
        assert "planner unavailable" in plan["reason"]
    assert "## DPO training" in md and "## Model step" in md and "## Attention kernels" in md


def _metrics(path: Path, train_losses: list[float], evals: list[tuple[float, float]]) -> Path:
    records = [
        {
            "split": "train",
            "step": i + 1,
            "loss": loss,
            "step_s": 2.0 if i == 0 else 0.5,
            "tokens_per_s": 10.0,
        }
        for i, loss in enumerate(train_losses)
    ]
    for step, (loss, accuracy) in zip((0, len(train_losses)), evals, strict=False):
        records.append(
            {
                "split": "eval",
                "step": step,
                "loss": loss,
                "rewards/accuracies": accuracy,
                "rewards/margins": 0.0,
                "count": 10,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_summarize_training_judges_the_held_out_split(tmp_path: Path) -> None:
    losses = [0.69, 0.70, 0.68, 0.66, 0.65, 0.64]
    learned = gpu_check.summarize_training(
        _metrics(tmp_path / "a.jsonl", losses, [(0.6931, 0.0), (0.68, 0.4)])
    )
    assert learned["learned"] is True and learned["steps"] == 6
    assert learned["step_s_median"] == 0.5  # the first (warm-up) step left out
    assert learned["train_loss_first"] == pytest.approx((0.69 + 0.70 + 0.68) / 3)
    assert learned["train_loss_last"] == pytest.approx((0.66 + 0.65 + 0.64) / 3)
    accurate = gpu_check.summarize_training(
        _metrics(tmp_path / "b.jsonl", losses, [(0.6931, 0.0), (0.70, 0.6)])
    )
    assert accurate["learned"] is True
    worse = gpu_check.summarize_training(
        _metrics(tmp_path / "c.jsonl", losses, [(0.6931, 0.0), (0.6931, 0.5)])
    )
    assert worse["learned"] is False and "0.6931 -> 0.6931" in worse["verdict"]
    no_eval = gpu_check.summarize_training(_metrics(tmp_path / "d.jsonl", losses, [(0.6931, 0.0)]))
    assert no_eval["learned"] is None and no_eval["eval_after"] is None
    assert gpu_check.summarize_training(tmp_path / "missing.jsonl") == {}


def test_compare_plan_takes_the_largest_rank() -> None:
    plan = {
        "fits": True,
        "step_time_s": 0.4,
        "ranks": [{"total_bytes": 10, "activation_bytes": 3}, {"total_bytes": 30, "activation_bytes": 5}],
    }
    result = gpu_check.compare_plan(plan, {"peak_memory_bytes": 45, "step_s_median": 0.5}, "h200-141gb")
    assert result["predicted_peak_bytes"] == 30 and result["measured_over_predicted"] == 1.5
    assert result["predicted_activation_bytes"] == 5 and result["measured_step_s"] == 0.5
    assert gpu_check.compare_plan(plan, {}, "h100-80gb")["measured_over_predicted"] is None


def test_pytest_counts_from_junit_and_summary(tmp_path: Path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="8" failures="1" errors="0" skipped="3"></testsuite></testsuites>'
    )
    assert gpu_check._junit_counts(xml) == {"passed": 4, "failed": 1, "skipped": 3, "errors": 0}
    assert gpu_check._junit_counts(tmp_path / "none.xml") is None
    log = tmp_path / "p.log"
    log.write_text("....\n2 failed, 5 passed, 1 skipped, 1 error in 3.2s\n")
    assert gpu_check._pytest_summary_counts(log) == {"passed": 5, "failed": 2, "skipped": 1, "errors": 1}
    log.write_text(
        "tests/test_a.py::test_x[flex-gqa] PASSED [ 25%]\ntests/test_a.py::test_x[te-mla] SKIPPED (no TE) [ 50%]\n"
        "tests/test_a.py::test_y FAILED [ 75%]\n"
    )
    assert gpu_check._pytest_verbose_counts(log) == {"passed": 1, "failed": 1, "skipped": 1, "errors": 0}


def test_plan_gpu_name() -> None:
    assert gpu_check.plan_gpu_name("NVIDIA H100 80GB HBM3", "x") == "h100-80gb"
    assert gpu_check.plan_gpu_name("NVIDIA H200", "x") == "h200-141gb"
    assert gpu_check.plan_gpu_name(None, "h200-141gb") == "h200-141gb"


def test_a_stage_past_its_limit_is_stopped_and_the_rest_still_run(tmp_path: Path) -> None:
    """A stage that overruns is stopped at its limit (its process group too) and recorded as a
    timeout; a later stage is then skipped for lack of budget rather than the check overrunning."""
    args = gpu_check.parse_args(["--out", str(tmp_path), "--budget", "30", "--dry-run"])
    checker = gpu_check.Checker(args, gpu_check.DRY_RUN)
    (tmp_path / "logs").mkdir()
    stage = gpu_check.Stage()
    start = time.monotonic()
    sleeper = (
        "import subprocess, time; print(subprocess.Popen(['sleep', '60']).pid, flush=True); time.sleep(60)"
    )
    proc = checker.run(stage, "sleeper", checker.python("-c", sleeper), time.monotonic() + 2)
    assert proc.timed_out and time.monotonic() - start < 15
    child = int(proc.tail(1))
    for _ in range(50):  # the grandchild went with its group (gone, or a zombie until reaped)
        stat = Path(f"/proc/{child}/stat")
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"pid {child} outlived its stage")
    checker.deadline = time.monotonic() + 3
    later = gpu_check.Stage()
    assert checker.limit_for(later, "plan") is None
    assert later.status == "skipped" and "no time left" in later.reason


@pytest.mark.slow
def test_gpu_tests_stage_counts_the_gpu_tests(tmp_path: Path) -> None:
    """The stage's own pytest run and its parsing; without CUDA every GPU test skips."""
    checker = gpu_check.Checker(gpu_check.parse_args(["--out", str(tmp_path)]), gpu_check.GPU)
    (tmp_path / "logs").mkdir()
    stage = gpu_check.Stage()
    checker.stage_gpu_tests(stage, time.monotonic() + 300)
    result = stage.result
    assert "tests/test_attention_backends.py" in result["files"], stage
    assert result["passed"] + result["skipped"] >= 8 and result["failed"] == result["errors"] == 0
    assert stage.status == "ok" and (torch.cuda.is_available() or result["passed"] == 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="without --dry-run this would run the real GPU check")
def test_without_cuda_the_gpu_check_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "gpu" and not report["summary"]["environment_ok"]
    for stage in report["stages"].values():
        assert stage["status"] == "skipped" and "no CUDA device" in stage["reason"]
    assert "no CUDA device" in (tmp_path / "report.md").read_text()


def test_given_data_is_used_with_its_tokenizer(tmp_path: Path) -> None:
    """``--data``: a dataset preprocessed elsewhere, its tokenizer found beside it after a copy."""
    data = tmp_path / "copied" / "hh"
    data.mkdir(parents=True)
    (tmp_path / "copied" / "tok.model").write_bytes(b"x")
    info = {"num_groups": 7, "tokenizer": {"path": "/elsewhere/tok.model", "vocab_size": 300}, "summary": {}}
    (data / "dataset.json").write_text(json.dumps(info))
    checker = gpu_check.Checker(
        gpu_check.parse_args(["--out", str(tmp_path / "o"), "--data", str(data)]), gpu_check.GPU
    )
    stage = gpu_check.Stage()
    checker.stage_data(stage, time.monotonic() + 10)
    assert stage.status == "ok" and stage.result["groups"] == 7 and stage.result["vocab_size"] == 300
    assert stage.result["tokenizer"] == str(tmp_path / "copied" / "tok.model")
    checker.args.data = tmp_path
    missing = gpu_check.Stage()
    checker.stage_data(missing, time.monotonic() + 10)
    assert missing.status == "failed" and "no dataset.json" in missing.reason
