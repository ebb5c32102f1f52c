"""``prefpack bench packing`` and ``prefpack bench step``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_prefpack.cli import main
from megatron_prefpack.data.bench import compare_layouts
from megatron_prefpack.data.packing import GroupLengths

LAYOUT_KEYS = {
    "rows",
    "padding_fraction",
    "tokens_per_group",
    "real_tokens_per_group",
    "attention_pairs_per_group",
    "tokens_ratio_vs_unpacked",
    "real_tokens_ratio_vs_unpacked",
    "attention_pairs_ratio_vs_unpacked",
}


def test_compare_layouts_excludes_groups_too_long_for_any_layout():
    # group 1 fits prefpack (9 + 2 + 20 = 31) and unpacked (rows of 20 and 22) but not duplicated (40)
    lengths = GroupLengths.from_arrays([4, 10, 3, 5], [[3, 2], [10, 10], [4, 4], [6, 1]])
    result = compare_layouts(lengths, seq_len=32, micro_batch_size=2)
    assert result["too_long"] == {"prefpack": 0, "duplicated": 1, "unpacked": 0}
    assert result["groups_read"] == 4 and result["groups"] == 3 and result["groups_excluded"] == 1
    layouts = result["layouts"]
    assert set(layouts) == {"prefpack", "duplicated", "unpacked", "unpacked_sorted"}
    # real tokens: prefpack shares the prompt, the baselines write it per response
    assert layouts["prefpack"]["real_tokens_per_group"] == (3 + 2 + 5 + 2 + 2 + 8 + 4 + 2 + 7) / 3
    assert layouts["duplicated"]["real_tokens_per_group"] == (8 + 5 + 6 + 8 + 10 + 7) / 3
    assert layouts["unpacked"]["tokens_per_group"] == 2 * 32
    # unpacked rows (7, 6), (7, 7), (11, 6): one group per micro-batch of two, padded to its longest
    assert layouts["unpacked_sorted"]["tokens_per_group"] == (14 + 14 + 22) / 3
    assert layouts["unpacked"]["attention_pairs_ratio_vs_unpacked"] == 1.0
    assert layouts["prefpack"]["attention_pairs_ratio_vs_unpacked"] < 1.0


def test_unpacked_sorted_needs_uniform_k():
    lengths = GroupLengths.from_arrays([4, 3], [[3, 2], [4, 4, 1]])
    assert "unpacked_sorted" not in compare_layouts(lengths, seq_len=32, micro_batch_size=2)["layouts"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A few HH-style records and a SentencePiece model trained on them."""
    pytest.importorskip("sentencepiece")
    from megatron_prefpack.data.tokenizer_training import train_tokenizer

    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "why", "how", "ok"]
    data = root / "data.jsonl"
    with data.open("w") as f:
        for i in range(60):
            prompt = " ".join(rng.choice(words, rng.integers(2, 30)))
            a, b = (" ".join(rng.choice(words, rng.integers(1, 20))) for _ in "ab")
            if i == 7:  # too long for a 256-token row in any layout
                prompt = " ".join(["why"] * 300)
            conv = f"\n\nHuman: {prompt}\n\nAssistant:"
            f.write(json.dumps({"chosen": f"{conv} {a}", "rejected": f"{conv} {b} no"}) + "\n")
    model = train_tokenizer(data, root / "tok", vocab_size=290)
    return data, model


def test_bench_packing_json(tiny_data, capsys):
    data, model = tiny_data
    assert (
        main(
            ["bench", "packing", "--data", str(data), "--tokenizer", str(model), "--seq-len", "256", "--json"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert {
        "data",
        "tokenizer",
        "seq_len",
        "groups",
        "groups_read",
        "too_long",
        "groups_excluded",
        "layouts",
    } <= set(result)
    assert result["groups_read"] == 60 and result["groups_excluded"] >= 1
    assert result["too_long"]["prefpack"] >= 1
    for figures in result["layouts"].values():
        assert set(figures) == LAYOUT_KEYS

    assert main(["bench", "packing", "--data", str(data), "--tokenizer", str(model), "--seq-len", "256"]) == 0
    table = capsys.readouterr().out
    assert "prefpack" in table and "unpacked_sorted" in table

    args = ["bench", "packing", "--data", str(data), "--tokenizer", str(model), "--seq-len", "256"]
    assert main([*args, "--max-prompt-len", "16", "--json"]) == 0
    truncated = json.loads(capsys.readouterr().out)
    assert truncated["prompts_truncated"] >= 1 and truncated["groups_excluded"] < result["groups_excluded"]


def test_bench_packing_reports_bad_input(tmp_path, tiny_data, capsys):
    _, model = tiny_data
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "x"}\n')
    args = ["bench", "packing", "--data", str(bad), "--tokenizer", str(model), "--seq-len", "256"]
    assert main(args) == 2
    assert "bad.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bench", "says"), [("packing", "from token counts alone"), ("step", "measured model time")]
)
def test_each_bench_has_its_own_help(bench, says, capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", bench, "--help"])
    assert done.value.code == 0
    assert f"usage: prefpack bench {bench}" in (out := capsys.readouterr().out) and says in out


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"--data": "/nonexistent/ds"}, "/nonexistent/ds: not a preprocessed dataset"),
        ({"--groups": "0"}, "--groups must be >= 1"),
        ({"--seq-len": "3"}, "no group fits a row of 3 tokens"),
        ({"--preset": "nope"}, "unknown model preset 'nope'"),
    ],
)
def test_bench_step_reports_bad_input(tmp_path, change, says, capsys):
    from tests.test_train import make_dataset

    args = {"--data": str(make_dataset(tmp_path / "ds", num_groups=2)), "--preset": "tiny-moe", **change}
    assert main(["bench", "step", *(x for kv in args.items() for x in kv)]) == 2
    captured = capsys.readouterr()
    assert says in captured.err and not captured.out


@pytest.mark.slow
def test_bench_step_times_the_model_on_every_layout(tmp_path, capsys):
    """A run on a tiny synthetic dataset in bf16: every layout timed, rows and token ratios
    consistent with the packing (times are printed, never asserted); peak GPU memory per layout
    on CUDA, null on the CPU."""
    import torch

    from tests.test_train import make_dataset

    data = make_dataset(tmp_path / "ds", num_groups=12)
    args = [
        "bench",
        "step",
        "--data",
        str(data),
        "--preset",
        "tiny-moe",
        "--seq-len",
        "64",
        "--dtype",
        "bfloat16",
    ]
    assert main([*args, "--groups", "8", "--repeats", "1", "--micro-batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    figures = result["layouts"]
    assert result["groups"] == 8 and set(figures) == {"prefpack", "duplicated", "unpacked"}
    assert result["dtype"] == "bfloat16" and result["parameters"] > 0
    assert figures["prefpack"]["rows"] <= figures["duplicated"]["rows"] < figures["unpacked"]["rows"] == 16
    for entry in figures.values():
        assert entry["seconds_per_pass"] > 0 and len(entry["seconds_all"]) == 1
        peak = entry["peak_memory_bytes"]
        assert peak > 0 if torch.cuda.is_available() else peak is None
    assert figures["unpacked"]["time_ratio_vs_unpacked"] == 1.0
    assert figures["prefpack"]["tokens_ratio_vs_duplicated"] < 1.0
