"""``prefpack train`` in this process, with its peak GPU memory written to a JSON file.

    python tools/gpu_check/train_peak.py PEAK.json --config C [KEY=VALUE ...]

Runs ``prefpack train`` unchanged and writes ``torch.cuda.max_memory_allocated()`` (bytes; None
on the CPU) twice: ``training_peak_bytes`` when the first checkpoint save starts (with
``checkpoint.interval: 0`` that is after the last step and the final evaluation, so a save
cut short by a time limit still leaves the training peak) and ``end_peak_bytes`` when the run
returns. Exits with ``prefpack train``'s status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    import torch

    from megatron_prefpack import cli
    from megatron_prefpack.training import checkpoint

    out = Path(argv[0])
    record: dict[str, Any] = {"training_peak_bytes": None, "end_peak_bytes": None}

    def peak() -> int | None:
        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None

    real_save = checkpoint.save
    saves: list[int] = []

    def save(*args: Any, **kwargs: Any) -> Any:
        if not saves:
            record["training_peak_bytes"] = peak()
            out.write_text(json.dumps(record))
        saves.append(1)
        return real_save(*args, **kwargs)

    checkpoint.save = save
    try:
        return cli.main(["train", *argv[1:]])
    finally:
        record["end_peak_bytes"] = peak()
        out.write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
