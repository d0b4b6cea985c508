"""Does the merge pay? lowlm's own stages, arm against arm, on the same corpus and held-out text.

Arms (each a run directory under --out, built by lowlm's stage functions, as `lowlm run` does):

- base: no training (the plain arm's stage-2 "before" figures: LoRA starts at zero, so that
  is the base model itself; scored directly when the plain arm is not trained);
- plain: LoRA on the base with its own tokenizer (no tokenize stage, pretrain.stage2 on
  model.base): what a user of a generic LoRA trainer does;
- merge-s2: tokenize (merge) -> resize -> pretrain stage 2;
- merge-s12: tokenize -> resize -> stage 1 (embeddings) -> stage 2.

Budgets: `--steps` stage-2 steps for the plain arm fix the budget; with --match flops every
other arm gets the same training FLOPs as the training loop counts them (its MFU count,
recorded by each pretrain stage as `training_flops`), so the merge arms, whose tokens carry
more text, see more characters; with --match chars, the same training characters. The
held-out documents are the run's (data.heldout_fraction, run.seed): identical across arms.

Prints per arm: held-out target nats/char and bits/char, base-language (English) nats/char,
another source's target text when given, tokens/char, FLOPs, characters seen, wall time, and
the learning curve (held-out nats/char at each eval point against FLOPs and characters).
Writes bench-adapt.json and bench-adapt.png into --out.

    .venv/bin/python scripts/bench_adapt.py --tiny            # test-sized models, about a minute
    .venv/bin/python scripts/bench_adapt.py --steps 40 --block-size 256 --threads 1
    .venv/bin/python scripts/bench_adapt.py --arm-set merge:resize.init=mean   # a lever
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import ASSETS, smollm2_folder  # noqa: E402

DEMO = REPO / "data" / "demo"
ARMS = ("plain", "merge-s2", "merge-s12")
PT_BR = ASSETS / "corpus" / "pt-BR"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="test-sized models on data/demo")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-adapt")
    parser.add_argument("--steps", type=int, help="plain arm's stage-2 steps (the budget)")
    parser.add_argument("--match", choices=["flops", "chars", "both"], default="flops")
    parser.add_argument(
        "--arms",
        default="plain,merge-s2,merge-s12",
        help="arms to train (comma-separated; the budget is the plain arm's either way)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep arms' stages already done with the same inputs in --out (default: retrain)",
    )
    parser.add_argument("--stage1-share", type=float, default=0.25, help="of merge-s12's budget")
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-lines", type=int, help="held-out and English lines scored")
    parser.add_argument("--vocab-size", type=int, help="tokenize.vocab_size of the merge arms")
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="stage-2 peak learning rate (every arm's LoRA)"
    )
    parser.add_argument(
        "--embedding-lr",
        type=float,
        default=3e-4,
        help="the merge arms' stage-2 embedding_lr (their embedding rows'); see docs/adapt.md",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--arm-set",
        action="append",
        default=[],
        metavar="ARMS:KEY=VALUE",
        help="a config override for some arms: plain, merge (both merge arms), merge-s2, "
        "merge-s12, all; e.g. merge:resize.init=mean (repeatable)",
    )
    return parser.parse_args(argv)


# ----- the assets --------------------------------------------------------------------------------


def tiny_assets(work: Path) -> dict:
    """An English SentencePiece base and a tiny tied Llama over it, as tests/conftest.py builds
    them; zh-TW from data/demo is the target language, data/demo/en.txt the base language."""
    from transformers import LlamaForCausalLM, LlamaTokenizer

    from lowlm.config import InitConfig, TokenizeConfig
    from lowlm.models.presets import llama_config
    from lowlm.tokenization.sentencepiece_merge import train_sentencepiece

    folder = work / "tiny-base"
    if not (folder / "model.safetensors").exists():
        sp_model = train_sentencepiece(
            DEMO / "en.txt", work / "sp-base" / "tokenizer", TokenizeConfig(vocab_size=800)
        )
        tokenizer = LlamaTokenizer.from_pretrained(str(sp_model), add_bos_token=True)
        init = InitConfig(
            size="custom",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
        config = llama_config(init, tokenizer)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        shutil.copyfile(sp_model, folder / "tokenizer.model")
    return {
        "base": str(folder),
        "corpus": [str(DEMO / "zh-tw.txt")],
        "texts": {"en": str(DEMO / "en.txt")},
        "scripts": ["Han"],
        "defaults": dict(steps=80, block_size=32, batch_size=2, eval_every=20, eval_lines=20),
        "vocab_size": 1500,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    }


def real_assets(work: Path) -> dict:
    """SmolLM2-135M (the asset GGUF as a dense folder) and the asset pt-BR corpus; the man
    pages are kept out of training as target text of another source."""
    if not PT_BR.is_dir():
        sys.exit(f"{PT_BR} is missing: run ../shared/tools/get-assets, or use --tiny.")
    other = work / "pt-other-source.txt"
    if not other.exists():
        # Paragraphs of 80+ characters from the man pages: another source than the training text.
        lines = (PT_BR / "manpages-pt-br.txt").read_text(encoding="utf-8").splitlines()
        other.write_text("\n".join([x for x in lines if len(x) >= 80][:200]) + "\n", "utf-8")
    return {
        "base": str(smollm2_folder(Path.home() / ".cache" / "lowlm", "or use --tiny")),
        "corpus": [
            str(PT_BR / n)
            for n in sorted(p.name for p in PT_BR.glob("*.txt"))
            if n != "manpages-pt-br.txt"
        ],
        "texts": {"en": str(DEMO / "en.txt"), "pt_other": str(other)},
        "scripts": ["Latin"],
        "defaults": dict(steps=40, block_size=256, batch_size=4, eval_every=10, eval_lines=150),
        "vocab_size": 8000,
        "lora": {},  # lowlm's defaults: r 64, alpha 128, attention and MLP (the levers that won)
    }


# ----- the arms' configs -----------------------------------------------------------------------


def common_config(args, assets: dict, heldout_file: Path) -> dict:
    """What every arm shares: the base, the corpus, the held-out rule, the training settings and
    the learning curve's texts (held-out target text and the base language, every eval)."""
    return {
        "run": {"root": str(args.out / "runs"), "seed": 1234},
        "model": {"base": assets["base"], "dtype": "fp32"},
        "data": {"heldout_fraction": 0.05},
        "tokenize": {
            "eval_texts": assets["texts"],
            "vocab_size": args.vocab_size,
            "scripts": assets["scripts"],
            "holdout_lines": args.eval_lines,
            "num_threads": 1,
        },
        "resize": {"eval_lines": args.eval_lines},
        "pretrain": {
            "corpus": assets["corpus"],
            "block_size": args.block_size,
            "batch_size": args.batch_size,
            "log_every": args.eval_every,
            "eval_every": args.eval_every,
            "save_every": 10**6,
            "max_eval_blocks": 8,
            "eval_lines": args.eval_lines,
            "energy": {"enabled": False},
            "eval_tasks": [
                {"name": "ppl", "path": str(heldout_file)},
                {"name": "ppl", "path": assets["texts"]["en"]},
            ],
            "stage1": {"steps": 0},
            "stage2": {"steps": 1, "lr": args.lr, "lora": assets["lora"]},
        },
    }


def arm_config(args, common: dict, arm: str, name: str, steps1: int, steps2: int):
    """One arm's config (written into --out) with its overrides, loaded as lowlm loads it."""
    from lowlm.config import apply_overrides, load_config

    raw = json.loads(json.dumps(common))
    raw["run"]["name"] = name
    merge = arm != "plain"
    raw["tokenize"]["merge"] = merge
    raw["tokenize"]["corpus"] = raw["pretrain"]["corpus"] if merge else []
    raw["pretrain"]["stage1"]["steps"] = steps1
    raw["pretrain"]["stage2"]["steps"] = steps2
    # The plain arm trains LoRA alone, as a generic LoRA trainer does; the merge arms train their
    # new rows beside it (lowlm's default; `all` is a lever measured in docs/adapt.md).
    raw["pretrain"]["stage2"]["train_embeddings"] = "new" if merge else "none"
    if merge:
        raw["pretrain"]["stage2"]["embedding_lr"] = args.embedding_lr
    overrides = [
        setting
        for spec in args.arm_set
        for arms, setting in [spec.split(":", 1)]
        if arm in arms.split(",") or "all" in arms.split(",") or (merge and "merge" in arms)
    ]
    raw = apply_overrides(raw, overrides)
    path = args.out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return load_config(path)


def prepare_merge(config, like=None) -> None:
    """tokenize -> resize for a merge arm; another arm's finished ones are copied in (their
    keys do not depend on the run's name, so the graph finds them done)."""
    from lowlm.stages import resize, tokenize

    if like is not None and not (config.run_dir / "manifest.json").exists():
        config.run_dir.mkdir(parents=True, exist_ok=True)
        for item in ("tokenizer", "model-resized", "manifest.json"):
            source = like.run_dir / item
            copy = shutil.copytree if source.is_dir() else shutil.copyfile
            copy(source, config.run_dir / item)
    tokenize.run(config)
    resize.run(config)


def train_arm(config, reuse: bool) -> None:
    """The arm's configured pre-training stages, in order: rerun, or with `reuse` kept when
    done with these inputs (an interrupted bench summarised from its run directories)."""
    from lowlm.stages import pretrain

    for stage in pretrain.configured_stages(config):
        pretrain.run_stage(config, stage, force=not reuse)


# ----- budgets -----------------------------------------------------------------------------------


def flops_per_step(config, stage: str) -> float:
    """The loop's FLOPs for one optimizer step of this stage (every token of a packed block
    is real)."""
    from lowlm.stages.pretrain import stage_flops_per_token

    per_token, per_attended = stage_flops_per_token(config, stage)
    cfg = config.pretrain
    tokens = cfg.batch_size * cfg.grad_accum * cfg.block_size
    return tokens * (per_token + per_attended * cfg.block_size)


def train_chars_per_token(config, tokenizer_dir: Path) -> float:
    """Characters per training token of this arm's tokenizer over its training documents (the
    held-out ones left out; one EOS per document, as the packer separates them)."""
    from lowlm.data.corpus import iter_documents, resolve_sources
    from lowlm.data.heldout import is_held_out
    from lowlm.models.load import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    chars = tokens = 0
    batch: list[str] = []
    seed, fraction = config.run.seed, config.data.heldout_fraction
    documents = iter_documents(resolve_sources(config.pretrain.corpus), config.data)
    for document in [*documents, None]:
        if document is not None and not is_held_out(document, seed, fraction):
            batch.append(document)
        if batch and (document is None or len(batch) == 256):
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            chars += sum(len(d) for d in batch)
            tokens += sum(len(x) + 1 for x in ids)
            batch = []
    return chars / tokens


def steps_for(budget: float, share: float, per_step1: float, per_step2: float, stage1: bool):
    """(stage-1 steps, stage-2 steps) spending `budget` (FLOPs or characters) per step cost."""
    steps1 = max(1, round(share * budget / per_step1)) if stage1 else 0
    steps2 = max(1, round((budget - steps1 * per_step1) / per_step2))
    return steps1, steps2


# ----- figures -----------------------------------------------------------------------------------


def heldout_tokens_per_char(tokenizer_dir: Path, lines: list[str]) -> float:
    from lowlm.models.load import load_tokenizer

    ids = load_tokenizer(tokenizer_dir)(lines, add_special_tokens=False)["input_ids"]
    return sum(map(len, ids)) / sum(map(len, lines))


def base_and_resized(merge_s2, plain, figures: dict) -> tuple[dict, dict]:
    """The base model's figures (the plain arm's "before" when it trained, else scored here on
    the same texts) and the untrained resized model's held-out figure (resize's record)."""
    from lowlm.data.corpus import resolve_sources
    from lowlm.models.load import load_pretrained, load_tokenizer
    from lowlm.models.metrics import score_texts
    from lowlm.rundir import RunDir
    from lowlm.training.pretrain_corpus import scored_texts

    resize = RunDir(merge_s2).read_manifest()["stages"]["resize"]["metrics"]
    if "plain" in figures:
        base = figures["plain"]["before"]
    else:
        texts = scored_texts(plain, resolve_sources(plain.pretrain.corpus))
        model = load_pretrained(plain.model.base)
        base = score_texts(model, load_tokenizer(Path(plain.model.base)), texts)
    if not math.isclose(base["heldout"], resize["heldout_loss_per_char_base"], rel_tol=1e-4):
        raise SystemExit("the base's held-out figure differs between the plain arm and resize")
    return base, {"heldout": resize["heldout_loss_per_char_resized"]}


def arm_figures(config, chars_per_token: float, lines: list[str]) -> dict:
    """One arm's figures from its run directory: the stages' manifest records (before / after
    scores, training FLOPs, tokens) and log.jsonl (the curve at each eval point)."""
    from lowlm.graph import PRETRAIN_BY_FLAG, tokenizer_folder
    from lowlm.rundir import RunDir
    from lowlm.stages.pretrain import configured_stages

    records = RunDir(config).read_manifest()["stages"]
    stages = [PRETRAIN_BY_FLAG[s].name for s in configured_stages(config)]
    metrics = [records[name]["metrics"] for name in stages]
    before, after = metrics[0]["loss_per_char_before"], metrics[-1]["loss_per_char_after"]
    cfg = config.pretrain
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
    curve = [{"flops": 0.0, "chars": 0.0, "heldout": before["heldout"], "en": before["en"]}]
    flops_done = chars_done = 0.0
    for name, figures in zip(stages, metrics, strict=True):
        flops_per_step = figures["training_flops"] / figures["steps"]
        for entry in _log(config.run_dir / name / "log.jsonl"):
            if "eval/ppl_heldout" in entry:
                curve.append(
                    {
                        "stage": name,
                        "step": entry["step"],
                        "flops": flops_done + entry["step"] * flops_per_step,
                        "chars": chars_done + entry["step"] * tokens_per_step * chars_per_token,
                        "heldout": entry["eval/ppl_heldout"] * math.log(2),
                        "en": entry.get("eval/ppl_en", math.nan) * math.log(2),
                    }
                )
        flops_done += figures["training_flops"]
        chars_done += figures["tokens"] * chars_per_token
    tokenizer_dir = tokenizer_folder(config) or Path(config.model.base)
    return {
        "stages": {name: figures["steps"] for name, figures in zip(stages, metrics, strict=True)},
        "before": before,
        "after": after,
        "heldout_bits_per_char": after["heldout"] / math.log(2),
        "tokens_per_char": heldout_tokens_per_char(tokenizer_dir, lines),
        "train_chars_per_token": chars_per_token,
        "training_flops": flops_done,
        "training_tokens": sum(m["tokens"] for m in metrics),
        "chars_seen": chars_done,
        # Each stage's recorded time: loading, packing, scoring and training.
        "wall_seconds": sum(records[name]["seconds"] for name in stages),
        "curve": curve,
    }


def _log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def print_table(results: dict) -> None:
    arms = results["arms"]
    base = results["base"]
    plain = arms["plain"]["after"]["heldout"] if "plain" in arms else None
    texts = [t for t in base if t != "heldout"]
    head = ["arm", "held-out nats/c", "bits/c", "x base", "x plain"]
    head += [f"{t} nats/c" for t in texts] + ["tok/char", "FLOPs", "chars seen", "wall s"]
    rows = [
        [
            "base (no training)",
            f"{base['heldout']:.4f}",
            f"{base['heldout'] / math.log(2):.4f}",
            "1.000",
            "-",
            *(f"{base[t]:.4f}" for t in texts),
            f"{results['base_tokens_per_char']:.4f}",
            "0",
            "0",
            "-",
        ]
    ]
    for name, arm in arms.items():
        held = arm["after"]["heldout"]
        rows.append(
            [
                name,
                f"{held:.4f}",
                f"{arm['heldout_bits_per_char']:.4f}",
                f"{held / base['heldout']:.3f}",
                f"{held / plain:.3f}" if plain else "-",
                *(f"{arm['after'][t]:.4f}" for t in texts),
                f"{arm['tokens_per_char']:.4f}",
                f"{arm['training_flops']:.3e}",
                f"{arm['chars_seen']:,.0f}",
                f"{arm['wall_seconds']:.0f}",
            ]
        )
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
    for name, arm in arms.items():
        points = ", ".join(f"{p['flops']:.2e}:{p['heldout']:.4f}" for p in arm["curve"])
        print(f"curve {name} (FLOPs:held-out nats/char): {points}")
    print(f"wall times on a shared, busy CPU: {results['machine']}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, axis, label in (
        (axes[0], "flops", "training FLOPs"),
        (axes[1], "chars", "characters seen"),
    ):
        for name, arm in results["arms"].items():
            style = "--" if name.endswith("-chars") else "-"
            xs = [p[axis] for p in arm["curve"]]
            ax.plot(xs, [p["heldout"] for p in arm["curve"]], style, marker="o", label=name)
        ax.axhline(results["base"]["heldout"], color="gray", linestyle=":", label="base")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out nats per character")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"bench_adapt: {results['setup']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"), dpi=110)
    plt.close(fig)
    path.with_suffix(".tmp.png").replace(path)


# ----- the run -----------------------------------------------------------------------------------


def plan_arms(args, plain, merge_s2, merge_s12) -> tuple[dict, dict]:
    """(arm name -> (kind, stage-1 steps, stage-2 steps), the budgets): every arm at the plain
    arm's FLOPs and/or characters."""
    from lowlm.graph import folder

    tokens_per_step = args.batch_size * args.block_size
    cost = {
        "plain": flops_per_step(plain, "2"),
        "stage2": flops_per_step(merge_s2, "2"),
        "stage1": flops_per_step(merge_s12, "1"),
    }
    chars_per_token = {
        "plain": train_chars_per_token(plain, Path(plain.model.base)),
        "merge": train_chars_per_token(merge_s2, folder(merge_s2, "tokenize")),
    }
    budgets = {
        "flops": args.steps * cost["plain"],
        "chars": args.steps * tokens_per_step * chars_per_token["plain"],
        "flops_per_step": cost,
        "train_chars_per_token": chars_per_token,
    }
    arms = {"plain": ("plain", 0, args.steps)}
    char_step = tokens_per_step * chars_per_token["merge"]
    for match in ("flops", "chars") if args.match == "both" else (args.match,):
        suffix = "" if match == "flops" else "-chars"
        per1, per2 = (cost["stage1"], cost["stage2"]) if match == "flops" else (char_step,) * 2
        budget = budgets[match]
        arms[f"merge-s2{suffix}"] = ("merge-s2", *steps_for(budget, 0, per1, per2, False))
        share = args.stage1_share
        arms[f"merge-s12{suffix}"] = ("merge-s12", *steps_for(budget, share, per1, per2, True))
    return arms, budgets


def main(argv=None) -> dict:
    from lowlm.data.corpus import iter_documents, resolve_sources
    from lowlm.data.heldout import heldout_document_lines, read_heldout
    from lowlm.graph import folder

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    assets = tiny_assets(args.out) if args.tiny else real_assets(args.out)
    for key, value in assets["defaults"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.vocab_size = args.vocab_size or assets["vocab_size"]
    heldout_file = args.out / "heldout.txt"
    # The base language: the first eval_lines paragraphs (scored at every eval point).
    english = args.out / "en.txt"
    english_lines = Path(assets["texts"]["en"]).read_text(encoding="utf-8").splitlines()
    english.write_text("\n".join(english_lines[: args.eval_lines]) + "\n", encoding="utf-8")
    assets["texts"]["en"] = str(english)
    common = common_config(args, assets, heldout_file)
    plain = arm_config(args, common, "plain", "plain", 0, args.steps)
    # The held-out lines by the run's rule: what every arm's held-out figure is measured on.
    documents = iter_documents(resolve_sources(plain.pretrain.corpus), plain.data)
    fraction, seed = plain.data.heldout_fraction, plain.run.seed
    lines = heldout_document_lines(documents, seed, fraction, args.eval_lines)
    heldout_file.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    merge_s2 = arm_config(args, common, "merge-s2", "merge-s2", 0, 1)
    prepare_merge(merge_s2)
    if read_heldout(folder(merge_s2, "tokenize"))[: len(lines)] != lines:
        raise SystemExit("the merge arm's held-out lines differ from the plain arm's")
    merge_s12 = arm_config(args, common, "merge-s12", "merge-s12", 1, 1)
    prepare_merge(merge_s12, like=merge_s2)
    arms, budgets = plan_arms(args, plain, merge_s2, merge_s12)

    figures = {}
    chosen = args.arms.split(",")
    for name, (kind, steps1, steps2) in arms.items():
        if kind not in chosen:
            continue
        config = arm_config(args, common, kind, name, steps1, steps2)
        if kind != "plain":
            prepare_merge(config, like=merge_s2)
        train_arm(config, args.reuse)
        kind_cpt = budgets["train_chars_per_token"]["plain" if kind == "plain" else "merge"]
        figures[name] = arm_figures(config, kind_cpt, lines)
    base, resized = base_and_resized(merge_s2, plain, figures)
    results = {
        "setup": (
            f"{'tiny' if args.tiny else 'SmolLM2-135M, pt-BR'}; plain {args.steps} steps of "
            f"{args.batch_size} x {args.block_size} tokens; match {args.match}; lr {args.lr}"
            f" (embedding rows {args.embedding_lr})"
        ),
        "command": "python scripts/bench_adapt.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{torch.get_num_threads()} torch threads",
        "heldout_lines": len(lines),
        "base": base,
        "base_tokens_per_char": heldout_tokens_per_char(Path(plain.model.base), lines),
        "resized": resized,
        "budgets": budgets,
        "arms": figures,
    }
    results["resized_over_base"] = results["resized"]["heldout"] / results["base"]["heldout"]
    path = args.out / "bench-adapt.json"
    path.with_suffix(".tmp").write_text(json.dumps(results, indent=1), encoding="utf-8")
    path.with_suffix(".tmp").replace(path)
    plot(results, args.out / "bench-adapt.png")
    print_table(results)
    print(f"untrained resize: {results['resized_over_base']:.3f}x the base's held-out nats/char")
    flops, chars = budgets["flops"], budgets["chars"]
    for name, arm in figures.items():
        print(
            f"{name}: FLOPs {arm['training_flops'] / flops:.3f}x the budget, characters "
            f"{arm['chars_seen'] / chars:.3f}x the plain arm's"
        )
    print(f"wrote {path} and {args.out / 'bench-adapt.png'}")
    return results


if __name__ == "__main__":
    main()
