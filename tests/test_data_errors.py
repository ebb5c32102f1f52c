"""Damaged inputs end in a clear ``file[:line]: reason`` error (exit 2 from the CLI), never a raw
traceback or a silently wrong dataset: truncated ``.gz`` input, deeply nested JSON, a full disk
while writing, and every way the files of a preprocessed dataset can disagree."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from megatron_prefpack.cli import main
from megatron_prefpack.data.group_dataset import DatasetError, GroupDataset, GroupDatasetWriter
from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.records import MAX_JSON_DEPTH
from tests.fixtures.tokenizer_files import hh_lines

# --- prefpack preprocess ---------------------------------------------------------------


def preprocess_cli(source: Path, tokenizer: Path, output: Path, *extra: str) -> int:
    args = ["--input", str(source), "--tokenizer", str(tokenizer), "--output", str(output), *extra]
    return main(["preprocess", "--no-progress", "--chunk-size", "16", *args])


def assert_no_dataset(output: Path) -> None:
    assert not (output / "dataset.json").exists() and not list(output.glob("groups.*"))
    assert not list(output.glob(".staging-*")), "a failed run leaves no staging directory behind"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_truncated_gzip_input_names_the_last_good_line(
    sp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    source = tmp_path / "hh.jsonl.gz"
    source.write_bytes(gzip.compress(("\n".join(hh_lines(120)) + "\n").encode())[:-4])
    output = tmp_path / "ds"
    assert preprocess_cli(source, sp_path, output, "--workers", workers, "--skip-invalid") == 2
    err = capsys.readouterr().err
    assert f"{source}:121: cannot read past line 120: the compressed stream ends early" in err
    assert "Traceback" not in err
    assert_no_dataset(output)


def nested_line(depth: int) -> str:
    return '{"prompt": "Q", "chosen": "a", "rejected": "b", "x": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_deeply_nested_json_is_an_invalid_record(
    sp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    lines = [*hh_lines(3), nested_line(100_000), *hh_lines(2), nested_line(MAX_JSON_DEPTH)]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert preprocess_cli(source, sp_path, tmp_path / "a", "--workers", workers) == 2
    err = capsys.readouterr().err
    assert f"{source}:4: field '<record>': nested deeper than {MAX_JSON_DEPTH} levels" in err
    assert "Traceback" not in err

    assert preprocess_cli(source, sp_path, tmp_path / "b", "--workers", workers, "--skip-invalid") == 0
    summary = GroupDataset(tmp_path / "b").info["summary"]
    assert summary["dropped"] == {"too_deep": 2} and summary["groups_written"] == 5
    assert [e.split(": ")[0] for e in summary["dropped_examples"]] == [f"{source}:4", f"{source}:7"]


def redirect_staged_tokens_to_dev_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's staged ``groups.bin`` becomes /dev/full: every flush of it fails with ENOSPC,
    as on a full disk (the first one once 8 KiB of tokens are buffered, again on close)."""
    make = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs) -> str:
        staging = make(*args, **kwargs)
        Path(staging, "groups.bin").symlink_to("/dev/full")
        return staging

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


def fail_saving_sidecars(monkeypatch: pytest.MonkeyPatch) -> None:
    def save(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", save)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("inject", [redirect_staged_tokens_to_dev_full, fail_saving_sidecars])
def test_full_disk_removes_the_staging_dir_and_names_the_output(
    sp_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    inject: Callable[[pytest.MonkeyPatch], None],
) -> None:
    source = tmp_path / "hh.jsonl"
    source.write_text("\n".join(hh_lines(150)) + "\n")
    output = tmp_path / "ds"
    inject(monkeypatch)
    assert preprocess_cli(source, sp_path, output, "--workers", "1") == 2
    err = capsys.readouterr().err
    assert f"{output}: cannot write the dataset: No space left on device" in err and "Traceback" not in err
    assert_no_dataset(output)


# --- opening a dataset -----------------------------------------------------------------

KIND_OF = {0: "pair", 1: "ranked", 2: "multi"}


def write_dataset(directory: Path, num_groups: int) -> Path:
    """Groups of every kind: prompts of 2-6 tokens, 1-3 responses of 1-4 tokens."""
    rng = np.random.default_rng(num_groups)
    with GroupDatasetWriter(directory, vocab_size=100) as writer:
        for i in range(num_groups):
            kind = KIND_OF[i % 3]
            k = 2 if kind == "pair" else int(rng.integers(1, 4))
            responses = [rng.integers(3, 100, rng.integers(1, 5)).astype(np.int32) for _ in range(k)]
            scores = {"pair": [1.0, 0.0], "ranked": list(rng.normal(size=k)), "multi": None}[kind]
            prompt = rng.integers(3, 100, rng.integers(2, 7)).astype(np.int32)
            writer.add(TokenizedGroup(i, prompt, responses, kind, scores, 0.5 if i == 0 else None), i + 1)
        writer.finalize({"tokenizer": {"vocab_size": 100, "pad_id": 0}})
    return directory


@pytest.fixture(scope="module")
def dataset_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dataset of 5 groups and one of 6, written once."""
    root = tmp_path_factory.mktemp("datasets")
    return write_dataset(root / "five", 5), write_dataset(root / "six", 6)


def edit_info(**changes) -> Callable[[Path, Path], None]:
    def edit(directory: Path, other: Path) -> None:
        info = json.loads((directory / "dataset.json").read_text())
        (directory / "dataset.json").write_text(json.dumps({**info, **changes}))

    return edit


def write_bytes(name: str, data: bytes) -> Callable[[Path, Path], None]:
    return lambda directory, other: (directory / name).write_bytes(data)


def patch_bytes(name: str, offset: int, data: bytes) -> Callable[[Path, Path], None]:
    def patch(directory: Path, other: Path) -> None:
        content = bytearray((directory / name).read_bytes())
        content[offset : offset + len(data)] = data
        (directory / name).write_bytes(bytes(content))

    return patch


def truncate(name: str, cut: int) -> Callable[[Path, Path], None]:
    return lambda directory, other: (directory / name).write_bytes((directory / name).read_bytes()[:-cut])


def append(name: str, data: bytes) -> Callable[[Path, Path], None]:
    return lambda directory, other: (directory / name).write_bytes((directory / name).read_bytes() + data)


def take_from_other(*names: str) -> Callable[[Path, Path], None]:
    """Replace files with those of the 6-group dataset (each consistent on its own)."""

    def take(directory: Path, other: Path) -> None:
        for name in names:
            shutil.copyfile(other / name, directory / name)

    return take


def save_array(name: str, array: np.ndarray, allow_pickle: bool = False) -> Callable[[Path, Path], None]:
    return lambda directory, other: np.save(directory / name, array, allow_pickle=allow_pickle)


def remove(name: str) -> Callable[[Path, Path], None]:
    return lambda directory, other: (directory / name).unlink()


HEADER = 34  # bytes before the sequence lengths in groups.idx (magic, version, dtype, two counts)

DAMAGE = {
    "no dataset.json": (remove("dataset.json"), "", ": not a preprocessed dataset (no dataset.json)"),
    "invalid JSON": (write_bytes("dataset.json", b'{"format":\n'), "dataset.json", ":2: invalid JSON"),
    "not an object": (write_bytes("dataset.json", b"[1]"), "dataset.json", ": expected a JSON object"),
    "format": (edit_info(format="other/2"), "dataset.json", ": field 'format': unsupported dataset format"),
    "num_groups type": (edit_info(num_groups="5"), "dataset.json", ": field 'num_groups': expected a non-"),
    "num_groups": (
        edit_info(num_groups=6),
        "dataset.json",
        ": field 'num_groups' is 6, but groups.idx holds 5",
    ),
    "num_sequences": (
        edit_info(num_sequences=3),
        "dataset.json",
        ": field 'num_sequences' is 3, but groups.idx",
    ),
    "token_dtype": (edit_info(token_dtype="int32"), "dataset.json", ": field 'token_dtype' is 'int32', but"),
    "fingerprint": (edit_info(fingerprint="abc"), "dataset.json", ": field 'fingerprint': expected 64"),
    "tokenizer": (edit_info(tokenizer=[]), "dataset.json", ": field 'tokenizer': expected an object"),
    "vocab_size": (
        edit_info(tokenizer={"vocab_size": "8k"}),
        "dataset.json",
        ": field 'tokenizer.vocab_size'",
    ),
    "idx missing": (remove("groups.idx"), "groups.idx", ": missing"),
    "idx header": (
        patch_bytes("groups.idx", 0, b"NOTANIDX"),
        "groups.idx",
        ": not a Megatron index (starts with b'NOTANIDX",
    ),
    "idx version": (
        patch_bytes("groups.idx", 9, b"\x02"),
        "groups.idx",
        ": Megatron index version 2, expected 1",
    ),
    "idx dtype code": (
        patch_bytes("groups.idx", 17, b"\x63"),
        "groups.idx",
        ": unknown token dtype code 99",
    ),
    "idx truncated": (truncate("groups.idx", 8), "groups.idx", " bytes, but its header's counts"),
    "idx empty": (write_bytes("groups.idx", b""), "groups.idx", ": not a Megatron index (0 bytes"),
    "idx trailing bytes": (append("groups.idx", bytes(8)), "groups.idx", " bytes, but its header's counts"),
    "idx length": (
        patch_bytes("groups.idx", HEADER, b"\x00\x00\x00\x00"),
        "groups.idx",
        ": sequence 0 has length 0",
    ),
    "idx pointer": (
        lambda d, o: patch_bytes("groups.idx", HEADER + 4 * _sequences(d) + 8, b"\x07")(d, o),
        "groups.idx",
        ": sequence pointers do not follow the sequence lengths",
    ),
    "idx documents": (
        lambda d, o: patch_bytes("groups.idx", HEADER + 12 * _sequences(d) + 8, b"\x01")(d, o),
        "groups.idx",
        ": document indices do not split",
    ),
    "idx last document": (
        lambda d, o: patch_bytes("groups.idx", HEADER + 12 * _sequences(d) + 8 * 5, b"\x01")(d, o),
        "groups.idx",
        ": not a readable Megatron index (AssertionError)",
    ),
    "bin missing": (remove("groups.bin"), "groups.bin", ": missing"),
    "bin empty": (write_bytes("groups.bin", b""), "groups.bin", ": empty"),
    "bin truncated": (truncate("groups.bin", 2), "groups.bin", " bytes, but groups.idx describes"),
    "bin and idx of another dataset": (
        take_from_other("groups.idx", "groups.bin"),
        "dataset.json",
        ": field 'num_groups' is 5, but groups.idx holds 6 groups",
    ),
    "kinds of another dataset": (
        take_from_other("kinds.npy"),
        "kinds.npy",
        ": 6 entries, but groups.idx holds 5",
    ),
    "margins short": (
        save_array("margins.npy", np.zeros(4)),
        "margins.npy",
        ": 4 entries, but groups.idx holds 5",
    ),
    "lines long": (
        save_array("lines.npy", np.arange(9)),
        "lines.npy",
        ": 9 entries, but groups.idx holds 5 groups",
    ),
    "scores per group": (
        save_array("scores.npy", np.zeros(5)),
        "scores.npy",
        ": 5 entries, but groups.idx holds",
    ),
    "kinds dtype": (
        save_array("kinds.npy", np.zeros(5, np.int64)),
        "kinds.npy",
        ": expected a 1-D uint8 array",
    ),
    "kinds 2-D": (save_array("kinds.npy", np.zeros((5, 1), np.uint8)), "kinds.npy", ": expected a 1-D uint8"),
    "kind out of range": (
        save_array("kinds.npy", np.full(5, 7, np.uint8)),
        "kinds.npy",
        ": group 0 has kind 7",
    ),
    "kinds garbage": (write_bytes("kinds.npy", b"garbage"), "kinds.npy", ": not a readable .npy array"),
    "kinds truncated": (truncate("kinds.npy", 2), "kinds.npy", ": not a readable .npy array"),
    "lines pickled": (
        save_array("lines.npy", np.array([{}] * 5, dtype=object), allow_pickle=True),
        "lines.npy",
        ": not a readable .npy array",
    ),
    "scores missing": (remove("scores.npy"), "scores.npy", ": missing"),
}


def _sequences(directory: Path) -> int:
    return json.loads((directory / "dataset.json").read_text())["num_sequences"]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_dataset_is_a_dataset_error_naming_the_file(
    dataset_dirs: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    five, six = dataset_dirs
    directory = tmp_path / "ds"
    shutil.copytree(five, directory)
    damage, name, reason = DAMAGE[case]
    damage(directory, six)
    with pytest.raises(DatasetError) as info:
        GroupDataset(directory)
    message = str(info.value)
    assert message.startswith(f"{directory / name if name else directory}:") and reason in message


def test_undamaged_copy_opens(dataset_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    shutil.copytree(dataset_dirs[0], tmp_path / "ds")
    assert len(GroupDataset(tmp_path / "ds")) == 5
