"""The demo's last step: the exported DPO model, loaded by transformers, is the trained model.

1. ``AutoModelForCausalLM.from_pretrained(HF_DIR)`` (fp32) computes, for held-out groups, each
   response's log-prob sum given its prompt on prompt+response alone, the way TRL and any
   evaluation harness do; the table that ``prefpack ref-logprobs --load <DPO checkpoint>`` wrote
   from packed rows must give the same numbers.
2. ``generate`` writes a greedy reply to a held-out prompt (the demo model is tiny: expect
   HH-RLHF-flavoured words, not sense).

  python examples/check_hf_export.py --hf-dir demo_out/hf --data demo_out/data \\
      --table demo_out/dpo_logprobs.npy --tokenizer demo_out/tokenizer.model
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from megatron_prefpack.data.group_dataset import GroupDataset
from megatron_prefpack.data.tokenizers import load_tokenizer
from megatron_prefpack.training.data import held_out


def response_logprob_sums(
    model: torch.nn.Module, prompt: np.ndarray, responses: list[np.ndarray]
) -> list[float]:
    """Each response's log-prob sum given ``prompt``, from one transformers forward per response."""
    sums = []
    for response in responses:
        ids = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
        logps = torch.log_softmax(logits, dim=-1)
        sums.append(float(logps.gather(-1, ids[0, len(prompt) :, None]).sum()))
    return sums


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="the exported Hugging Face directory")
    parser.add_argument("--data", required=True, help="the preprocessed dataset")
    parser.add_argument("--table", required=True, help="prefpack ref-logprobs output of the same checkpoint")
    parser.add_argument("--tokenizer", required=True, help="the dataset's tokenizer (decodes the reply)")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="the run's data.eval_fraction")
    parser.add_argument("--groups", type=int, default=32, help="held-out groups to compare")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |difference| of a sum (nats)")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    dataset = GroupDataset(args.data)
    table = np.load(args.table)
    ids = np.arange(len(dataset))
    groups = ids[held_out(ids, args.eval_fraction)][: args.groups]
    diffs = []
    for group_id in groups:
        group = dataset[int(group_id)]
        for k, value in enumerate(response_logprob_sums(model, group.prompt, group.responses)):
            diffs.append(abs(value - table[group_id, k]))
    worst = max(diffs)
    print(
        f"transformers ({type(model).__name__}) vs packed rows: {len(diffs)} held-out response "
        f"log-prob sums, max |difference| {worst:.2e} nats (mean {np.mean(diffs):.2e})"
    )

    tokenizer = load_tokenizer(args.tokenizer)
    prompt = dataset[int(groups[0])].prompt
    reply = model.generate(
        input_ids=torch.from_numpy(prompt.astype(np.int64))[None],
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.eos_id,
    )[0, len(prompt) :]
    print(f"held-out prompt (end): ...{tokenizer.decode(prompt.tolist())[-160:]!r}")
    print(f"greedy reply from transformers: {tokenizer.decode(reply.tolist())!r}")
    if worst > args.tolerance:
        print(
            f"check_hf_export: difference {worst:.2e} above --tolerance {args.tolerance:g}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
