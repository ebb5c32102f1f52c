"""Shared pytest fixtures. Keep this file small: nothing here runs unless a test asks for it.

- ``megatron_single_process``: Megatron's parallel state for one process (world size 1, gloo on
  CPU, every parallel size 1, seed 1234), torn down after the test. On CPU it also applies
  ``enable_cpu_megatron()``, whose patches stay for the rest of the pytest process.
- ``sp_path`` / ``hf_dir``: a small SentencePiece model and a Hugging Face tokenizer directory
  (``tokenizer.json`` + ``tokenizer_config.json``), trained once per session.
- Multi-process tests use ``tests.distributed.run_distributed`` instead.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# ``from tests.distributed import ...`` must work however pytest was started (rank processes
# re-import test modules with this path too).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.fixtures.tokenizer_files import hf_tokenizer_dir, sentencepiece_model  # noqa: E402


@pytest.fixture
def megatron_single_process() -> Iterator[None]:
    """Initialize ``megatron.core.parallel_state`` for this process alone; destroy it afterwards."""
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize()
    try:
        yield
    finally:
        dist_platform.destroy()


@pytest.fixture(scope="session")
def sp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sentencepiece_model(tmp_path_factory)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_tokenizer_dir(tmp_path_factory)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Kill whatever this session started and left alive: a rank stuck after its test ended
    or a multiprocessing helper (forkserver, resource tracker) must not keep pytest, and so CI,
    from exiting once the results are in."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
