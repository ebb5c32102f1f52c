"""Reading the small JSON files this package keeps beside its data, models and checkpoints.

One rule for every such file: a file that cannot be read, is not UTF-8 or is not valid JSON
raises the caller's error type with a message that starts with the file (and the line, for a
syntax error), never a bare ``json``/``OSError`` traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception]) -> Any:
    """The JSON value stored in ``path``; raises ``error("<path>[:<line>]: reason")``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: invalid JSON: {err.msg} at column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror or err}") from None


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """Like :func:`read_json`, and the value must be a JSON object."""
    value = read_json(path, error)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
