"""How good is a resized model before any training? Held-out nats/char of new-row initialisations.

The table in docs/adapt.md ("The untrained resize"): the base model is resized for a merged
tokenizer by lowlm's `resize_embeddings` (sub-word mean, or `mean`), then the new rows are
overwritten by each experimental initialisation in turn and the same held-out lines are scored
(lowlm's own `loss_per_char`, the figure `resize` records). Experimental rows, none of them a
lowlm option (none beat the sub-word mean by more than 0.4%):

- `linear`: the pieces' rows weighted 1..k, the last piece heaviest; `first`, `last`: one piece;
- `shrunk`: the sub-word mean pulled 20% towards the mean of all rows (lower logits);
- `hewitt:B`: the sub-word mean lowered along the mean final hidden state by B nats of logit
  (Hewitt 2021: new output rows must not out-score the old ones); `hewitt-k:B`: B x (pieces - 1);
- `untied-mean`, `untied-first:B`: the LM head copied into a matrix of its own (as an untied base
  has), input rows the sub-word mean, new output rows the sub-word mean or the first piece's row
  lowered by B.

    PYTHONPATH=src python scripts/bench_init.py --bench-out /tmp/ba-real/main
    PYTHONPATH=src python scripts/bench_init.py --base BASE --tokenizer RUN/tokenizer \\
        --heldout RUN/tokenizer/heldout.txt --hidden-text corpus.txt

`--bench-out` takes the base, merged tokenizer, held-out lines and corpus of a
`scripts/bench_adapt.py` output folder (its merge-s2 run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

DEFAULT_INITS = [
    "subword_mean",
    "mean",
    "linear",
    "first",
    "last",
    "shrunk",
    "hewitt:0.5",
    "hewitt:1",
    "hewitt:2",
    "hewitt-k:0.5",
    "hewitt-k:1",
    "untied-mean",
    "untied-first:0",
    "untied-first:0.5",
    "untied-first:1",
    "untied-first:2",
    "untied-first:3",
]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench-out", type=Path, help="a bench_adapt.py --out folder")
    parser.add_argument("--base", help="the base model (folder)")
    parser.add_argument("--tokenizer", help="the merged tokenizer folder")
    parser.add_argument("--heldout", type=Path, help="held-out lines (one text per line)")
    parser.add_argument("--hidden-text", type=Path, help="text for the mean final hidden state")
    parser.add_argument("--lines", type=int, default=100, help="held-out lines scored")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("inits", nargs="*", default=DEFAULT_INITS)
    args = parser.parse_args(argv)
    if args.bench_out:
        config = yaml.safe_load((args.bench_out / "configs" / "merge-s2.yaml").read_text())
        run = Path(config["run"]["root"]) / config["run"]["name"]
        args.base = args.base or config["model"]["base"]
        args.tokenizer = args.tokenizer or str(run / "tokenizer")
        args.heldout = args.heldout or args.bench_out / "heldout.txt"
        args.hidden_text = args.hidden_text or Path(config["pretrain"]["corpus"][0])
    missing = [n for n in ("base", "tokenizer", "heldout", "hidden_text") if not getattr(args, n)]
    if missing:
        sys.exit(f"give --bench-out, or all of: {', '.join('--' + m for m in missing)}")
    return args


def input_rows(kind: str, old: torch.Tensor, pieces: list[list[int]]) -> torch.Tensor:
    rows = []
    for ids in pieces:
        e = old[ids]
        if kind == "linear":
            w = torch.arange(1, len(ids) + 1, dtype=e.dtype)
            rows.append((w[:, None] * e).sum(0) / w.sum())
        elif kind == "first":
            rows.append(e[0])
        elif kind == "last":
            rows.append(e[-1])
        elif kind == "shrunk":
            rows.append(0.8 * e.mean(0) + 0.2 * old.mean(0))
        else:
            rows.append(e.mean(0))
    return torch.stack(rows)


def main(argv=None) -> dict:
    args = parse(argv)
    from transformers import AutoModelForCausalLM

    from lowlm.models.load import load_tokenizer
    from lowlm.models.metrics import loss_per_char
    from lowlm.models.resize import resize_embeddings, subword_pieces

    torch.set_num_threads(args.threads)
    lines = args.heldout.read_text(encoding="utf-8").splitlines()[: args.lines]
    base_tokenizer = load_tokenizer(Path(args.base))
    tokenizer = load_tokenizer(Path(args.tokenizer))
    results = {}

    def load(init: str):
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        model.eval()
        return model, resize_embeddings(model, base_tokenizer, tokenizer, init, 64, 1234)

    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
        results["base"] = loss_per_char(model, base_tokenizer, lines)
        print(f"{'base (its own tokenizer)':28s} {results['base']:.4f}", flush=True)
        text = args.hidden_text.read_text(encoding="utf-8")[:20000]
        ids = base_tokenizer(text, return_tensors="pt").input_ids[:, :1024]
        hidden = model.model(ids).last_hidden_state[0]
        # Moving a row by -B * u lowers its logit by B wherever the hidden state is the mean one.
        u = hidden.mean(0) / hidden.mean(0).dot(hidden.mean(0))

        model, resized = load("subword_mean")
        first_new, end = resized.new_token_ids[0], resized.new_token_ids[-1] + 1
        embedding = model.get_input_embeddings().weight
        old = embedding[: len(base_tokenizer)].clone()
        pieces = [subword_pieces(base_tokenizer, tokenizer, t) for t in resized.new_token_ids]
        counts = torch.tensor([len(p) for p in pieces], dtype=torch.float32)
        subword_mean = embedding[first_new:end].clone()
        for spec in args.inits:
            kind, _, margin = spec.partition(":")
            margin = float(margin or 0)
            if kind == "mean":  # lowlm's resize.init: mean, from a fresh resize
                scored, _ = load("mean")
            elif kind.startswith("untied"):
                scored = model
                embedding[first_new:end] = subword_mean
                head = torch.nn.Parameter(embedding.detach().clone())
                model.lm_head.weight = head  # the tie is gone: input rows stay the sub-word mean
                rows = subword_mean if kind == "untied-mean" else input_rows("first", old, pieces)
                head[first_new:end] = rows - margin * u[None, :]
            else:
                scored = model
                if kind.startswith("hewitt"):
                    scale = counts - 1 if kind == "hewitt-k" else torch.ones_like(counts)
                    rows = subword_mean - (margin * scale)[:, None] * u[None, :]
                elif kind == "subword_mean":
                    rows = subword_mean
                else:
                    rows = input_rows(kind, old, pieces)
                embedding[first_new:end] = rows
            results[spec] = loss_per_char(scored, tokenizer, lines)
            ratio = results[spec] / results["base"]
            print(f"{spec:28s} {results[spec]:.4f}  {ratio:.3f}x base", flush=True)
            if kind.startswith("untied"):  # tie again for the next row
                model.lm_head.weight = embedding
    return results


if __name__ == "__main__":
    main()
