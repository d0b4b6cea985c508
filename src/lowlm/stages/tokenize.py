"""`lowlm tokenize`: train a target-language tokenizer and merge it into the base vocabulary.

Reads `tokenize`, `data` and `model` from the config; writes `<run>/tokenizer/` (an HF
tokenizer folder; `tokenizer.model` too for SentencePiece bases), `report.json` and
`report.png` in it, and the stage's record in `manifest.json`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lowlm.config import LowlmConfig
from lowlm.data.corpus import iter_documents, read_lines, resolve_sources
from lowlm.data.heldout import HELDOUT_FILE, is_held_out
from lowlm.errors import LowlmError
from lowlm.execute import StageRun, execute
from lowlm.graph import corpus_patterns, folder
from lowlm.rundir import atomic_dir, atomic_write_json
from lowlm.tokenization.base import (
    BaseTokenizer,
    bare_sentencepiece_options,
    copy_config_files,
    resolve_base_tokenizer,
)
from lowlm.tokenization.base import tokenizer_hash as hash_tokenizer
from lowlm.tokenization.byte_bpe_merge import extend_byte_level_bpe
from lowlm.tokenization.pieces_curve import byte_bpe_curve, sentencepiece_curve
from lowlm.tokenization.report import compare, format_table, write_chart
from lowlm.tokenization.sentencepiece_merge import (
    load_proto,
    merge_into_sentencepiece,
    sentencepiece_processor,
    train_sentencepiece,
)

STAGE = "tokenize"


def _split_corpus(config: LowlmConfig, sources, train_file: Path) -> list[str]:
    """Stream the corpus's lines into a training file on disk, leaving out every line of a
    held-out document (lowlm.data.heldout); return up to holdout_lines of those lines."""
    held_out: list[str] = []
    fraction, seed = config.data.heldout_fraction, config.run.seed
    with open(train_file, "w", encoding="utf-8") as out:
        for document in iter_documents(sources, config.data):
            lines = [line for line in document.split("\n") if line.strip()]
            if is_held_out(document, seed, fraction):
                held_out.extend(lines[: config.tokenize.holdout_lines - len(held_out)])
            else:
                out.writelines(line + "\n" for line in lines)
    if train_file.stat().st_size == 0:
        raise LowlmError(
            "every corpus document was held out; add text or lower data.heldout_fraction."
        )
    return held_out


def _train_lines(train_file: Path) -> Iterator[str]:
    with open(train_file, encoding="utf-8") as handle:
        for line in handle:
            yield line.rstrip("\n")


def _check_added_tokens(base_tokenizer, first_new_id: int) -> None:
    """New pieces take ids from first_new_id on; a base token already there would be shadowed."""
    clashing = [t for t, i in base_tokenizer.get_added_vocab().items() if i >= first_new_id]
    if clashing:
        raise LowlmError(
            f"the base tokenizer has added tokens beyond its SentencePiece vocabulary "
            f"({', '.join(clashing[:5])}); new pieces would take their ids. Use a base "
            "tokenizer without them, or add them back after the merge."
        )


def _build_sentencepiece(base: BaseTokenizer, trained_model: Path, config, out: Path, base_hf):
    proto = load_proto(base.sp_model)
    _check_added_tokens(base_hf, len(proto.pieces))
    result = merge_into_sentencepiece(proto, load_proto(trained_model), config.tokenize.scripts)
    (out / "tokenizer.model").write_bytes(result.proto.SerializeToString())
    copy_config_files(base.folder, out)
    tokenizer_class = type(base_hf)
    options = bare_sentencepiece_options(base.folder)
    tokenizer_class.from_pretrained(str(out), **options).save_pretrained(out)
    return result.proto, result.new_pieces, result.skipped


def _build_byte_bpe(base: BaseTokenizer, train_file: Path, config, out: Path):
    tokenizer_json = json.loads((base.folder / "tokenizer.json").read_text(encoding="utf-8"))
    result = extend_byte_level_bpe(
        tokenizer_json,
        _train_lines(train_file),
        n_merges=config.tokenize.vocab_size,
        scripts=config.tokenize.scripts,
        min_frequency=config.tokenize.min_frequency,
    )
    copy_config_files(base.folder, out)
    (out / "tokenizer.json").write_text(json.dumps(result.tokenizer_json, ensure_ascii=False))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out).save_pretrained(out)
    return result.new_tokens, result.skipped


def _compression_curve(base: BaseTokenizer, out: Path, sp_proto, held_out: list[str]):
    """Held-out tokens per character with only the first k new pieces, for a few k."""
    if sp_proto is not None:
        return sentencepiece_curve(sp_proto, len(load_proto(base.sp_model).pieces), held_out)
    base_json = json.loads((base.folder / "tokenizer.json").read_text(encoding="utf-8"))
    merged_json = (out / "tokenizer.json").read_text(encoding="utf-8")
    return byte_bpe_curve(merged_json, len(base_json["model"]["merges"]), held_out)


def _reachability(tokenizer, new_tokens: list[str], sp_proto=None) -> tuple[int, int]:
    """(reachable, partial): how many new tokens the tokenizer produces for their own text (the
    others are rows no input reaches), and how many new byte-level tokens are fragments of a
    character (steps towards whole characters, not checkable on their own). SentencePiece
    pieces are checked without the dummy "▁" prefix, which would change the text."""
    reachable = partial = 0
    if sp_proto is not None:
        no_prefix = type(sp_proto)()
        no_prefix.CopyFrom(sp_proto)
        no_prefix.normalizer_spec.add_dummy_prefix = False
        processor = sentencepiece_processor(no_prefix)
        for token in new_tokens:
            reachable += processor.encode(token.replace("▁", " ")) == [processor.piece_to_id(token)]
        return reachable, partial
    for token in new_tokens:
        text = tokenizer.convert_tokens_to_string([token])
        if "\ufffd" in text:
            partial += 1
            continue
        reachable += tokenizer.encode(text, add_special_tokens=False) == [
            tokenizer.convert_tokens_to_ids(token)
        ]
    return reachable, partial


def run(config: LowlmConfig, force: bool = False) -> dict:
    """Train, merge, verify and report; returns the report."""
    execute(config, STAGE, _work, force=force)
    return json.loads((folder(config, STAGE) / "report.json").read_text(encoding="utf-8"))


def _work(run: StageRun) -> dict:
    config = run.config
    cfg = config.tokenize
    field = "tokenize.corpus" if cfg.corpus else "prepare's corpus/"
    sources = resolve_sources(corpus_patterns(config, "tokenize"), field)
    named = config.model.tokenizer or config.model.base
    base = resolve_base_tokenizer(config.model) if cfg.merge else None
    # merge: false: the tokenizer the config names (if any) is the one it is compared with
    reference = resolve_base_tokenizer(config.model) if not cfg.merge and named else None
    started = time.time()
    work = Path(tempfile.mkdtemp(dir=run.run_dir.path, prefix=".tokenize-work-"))
    try:
        with atomic_dir(run.folder) as out:
            report = _build(config, base, sources, work, out, reference)
            report["seconds"] = round(time.time() - started, 2)
            atomic_write_json(out / "report.json", report)
            write_chart(report["texts"], out / "report.png", report.get("compression_curve"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokenizer_hash = hash_tokenizer(run.folder)

    merged = ("new_tokens", "reachable_new_tokens") if report["merged"] else ()
    metrics = {k: report[k] for k in ("vocab_size", *merged)}
    for label, entry in report["texts"].items():
        metrics[f"{label}.chars_per_token"] = round(entry["after"]["chars_per_token"], 4)
        if "lines_changed" in entry:
            metrics[f"{label}.lines_changed"] = entry["lines_changed"]
    print(format_table(report["texts"]))
    added = (
        f"{report['new_tokens']} new tokens ({report['reachable_new_tokens']} reachable)"
        if report["merged"]
        else "trained alone"
    )
    print(f"tokenize: {added}, vocabulary {report['vocab_size']}; wrote {run.folder}")
    return {
        "metrics": metrics,
        "record": {"tokenizer_hash": tokenizer_hash, "vocab_size": report["vocab_size"]},
    }


def _build(config: LowlmConfig, base, sources, work: Path, out: Path, reference=None) -> dict:
    from transformers import AutoTokenizer, LlamaTokenizer

    cfg = config.tokenize
    train_file = work / "train.txt"
    held_out = _split_corpus(config, sources, train_file)
    # Later stages report loss per character on the same held-out text.
    (out / HELDOUT_FILE).write_text("".join(line + "\n" for line in held_out), encoding="utf-8")
    base_hf = base.load_hf(config.model.trust_remote_code) if base is not None else None
    reference_hf = reference.load_hf(config.model.trust_remote_code) if reference else None
    report: dict = {
        "kind": base.kind if base else "sentencepiece",
        "base": base.source if base else None,
        "merged": base is not None,
        "reference": reference.source if reference else None,
        "reference_vocab_size": len(reference_hf) if reference_hf is not None else None,
    }

    sp_proto = None
    if base is not None and base.kind == "byte_bpe":
        new_tokens, skipped = _build_byte_bpe(base, train_file, config, out)
    else:
        started = time.time()
        trained_model = train_sentencepiece(train_file, work / "target", cfg)
        report["train_seconds"] = round(time.time() - started, 2)
        report["train_mb_per_s"] = round(
            train_file.stat().st_size / 1e6 / max(report["train_seconds"], 1e-6), 2
        )
        shutil.copyfile(trained_model, out / "target.model")
        if base is not None:
            sp_proto, new_tokens, skipped = _build_sentencepiece(
                base, trained_model, config, out, base_hf
            )
        else:
            sp_proto = load_proto(trained_model)
            (out / "tokenizer.model").write_bytes(sp_proto.SerializeToString())
            options = bare_sentencepiece_options(None)
            LlamaTokenizer.from_pretrained(str(out), **options).save_pretrained(out)
            new_tokens, skipped = [], {}

    merged = AutoTokenizer.from_pretrained(out)
    reachable, partial = _reachability(merged, new_tokens, sp_proto)
    report.update(
        vocab_size=len(merged),
        base_vocab_size=len(base_hf) if base_hf is not None else None,
        new_tokens=len(new_tokens),
        reachable_new_tokens=reachable,
        partial_character_tokens=partial,
        skipped_pieces=skipped,
    )
    texts = {"heldout": held_out} if held_out else {}
    for label, path in cfg.eval_texts.items():
        texts[label] = read_lines(path, config.data)
    before = base_hf if base_hf is not None else reference_hf
    report["texts"] = {label: compare(before, merged, lines) for label, lines in texts.items()}
    if base is not None and held_out:
        report["compression_curve"] = _compression_curve(base, out, sp_proto, held_out)
    fast_ids = merged(held_out, add_special_tokens=False)["input_ids"] if held_out else []
    report["roundtrip_failures"] = sum(
        merged.decode(ids) != line for line, ids in zip(held_out, fast_ids, strict=True)
    )
    if sp_proto is not None and held_out:
        processor = sentencepiece_processor(sp_proto)
        report["fast_vs_sentencepiece_mismatches"] = sum(
            processor.encode(line) != ids for line, ids in zip(held_out, fast_ids, strict=True)
        )
    return report
