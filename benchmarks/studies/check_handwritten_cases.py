"""How many CounterFact cases does the default model know before any edit?

    python benchmarks/studies/check_handwritten_cases.py [PATH] [--keep-known OUT]

PATH (default ``assets/handwritten_counterfact_cases.json``) is a list of CounterFact records. For each case the
teacher-forced mean per-token negative log-likelihood of " " + target_true.str and " " + target_new.str
is computed after each filled prompt (the prompt is tokenised with the tokenizer's special tokens, i.e.
Gemma's BOS; the target without). Per case it prints:

- ``prompt``: target_true is more likely than target_new on the rewrite prompt (lower NLL);
- ``top1``: target_true's first token is the model's top-1 next token on the rewrite prompt;
- ``para`` / ``neigh``: share of paraphrase / neighbourhood prompts where true beats new.

A case is *known* when both ``prompt`` and ``top1`` hold. The summary gives the known count and the
mean shares; the mean neighbourhood share is the unedited "neighbourhood score" (NS) of CounterFact.
``--keep-known OUT`` writes the known cases, renumbered 0..N-1, to OUT.

Run from the repository root after `pip install -e .` (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from explorer.core.models import load_model

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "assets" / "handwritten_counterfact_cases.json"


@torch.no_grad()
def score(handle, prompt: str, targets: list[str]) -> tuple[list[float], int]:
    """Mean per-token NLL of each target after ``prompt``, and the top-1 next-token id after the prompt."""
    tok = handle.tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    nlls, top1 = [], None
    for target in targets:
        target_ids = tok(target, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + target_ids], device=handle.device)
        # only the positions that predict the target: the prompt's last token and all target tokens but the last
        logits = handle.model(input_ids=ids, logits_to_keep=len(target_ids) + 1).logits[0, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        picked = log_probs[torch.arange(len(target_ids)), torch.tensor(target_ids)]
        nlls.append(-picked.mean().item())
        top1 = int(log_probs[0].argmax())
    return nlls, top1


def true_beats_new(handle, prompt: str, true: str, new: str) -> bool:
    (nll_true, nll_new), _ = score(handle, prompt, [true, new])
    return nll_true < nll_new


def check_case(handle, record: dict) -> dict:
    """The per-case measures described in the module docstring."""
    rewrite = record["requested_rewrite"]
    true, new = " " + rewrite["target_true"]["str"], " " + rewrite["target_new"]["str"]
    prompt = rewrite["prompt"].format(rewrite["subject"])
    (nll_true, nll_new), top1 = score(handle, prompt, [true, new])
    first_true = handle.tokenizer(true, add_special_tokens=False)["input_ids"][0]
    para = [true_beats_new(handle, p, true, new) for p in record["paraphrase_prompts"]]
    neigh = [true_beats_new(handle, p, true, new) for p in record["neighborhood_prompts"]]
    return {
        "case_id": record["case_id"],
        "prompt": nll_true < nll_new,
        "top1": top1 == first_true,
        "top1_token": handle.tokenizer.decode([top1]),
        "nll_true": nll_true,
        "nll_new": nll_new,
        "para": sum(para) / len(para),
        "neigh": sum(neigh) / len(neigh),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--keep-known", type=Path, metavar="OUT", help="write the known cases, renumbered, to OUT")
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = json.loads(args.path.read_text())
    handle = load_model()
    results = []
    for record in records:
        r = check_case(handle, record)
        results.append(r)
        rw = record["requested_rewrite"]
        print(
            f"{r['case_id']:3d} {rw['relation_id']:6s} {rw['prompt'].format(rw['subject'])!r:60.60s} "
            f"{rw['target_true']['str']!r:>16s} vs {rw['target_new']['str']!r:16s} "
            f"prompt={'Y' if r['prompt'] else 'n'} top1={'Y' if r['top1'] else 'n'} ({r['top1_token']!r}) "
            f"para={r['para']:.2f} neigh={r['neigh']:.2f}",
            flush=True,
        )
    known = [rec for rec, r in zip(records, results) if r["prompt"] and r["top1"]]
    n = len(results)
    print(f"\ncases: {n}")
    print(f"true > new on the prompt: {sum(r['prompt'] for r in results)}")
    print(f"top-1 first token on the prompt: {sum(r['top1'] for r in results)}")
    print(f"cases known (both): {len(known)}")
    print(f"mean paraphrase share (true > new): {sum(r['para'] for r in results) / n:.3f}")
    print(f"mean neighbourhood share (unedited NS): {sum(r['neigh'] for r in results) / n:.3f}")
    if args.keep_known:
        for i, rec in enumerate(known):
            rec["case_id"] = i
        args.keep_known.write_text(json.dumps(known, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {len(known)} known cases to {args.keep_known}")


if __name__ == "__main__":
    main()
