"""`lowlm prepare` end to end on small corpora built from the bundled demo text (offline LID)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from .conftest import DEMO, EN_LINES, ZH_LINES, blocks, invoke, prepare_config, write_text

runner = CliRunner()


def kept_rows(tmp_path) -> list[dict]:
    rows = []
    for shard in sorted((tmp_path / "runs" / "t" / "corpus").glob("*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return rows


def test_prepare_keeps_the_target_language_drops_copies_and_writes_stats(write_config, tmp_path):
    zh = blocks(ZH_LINES, 6, 60)
    raw = write_text(tmp_path / "raw.txt", zh + blocks(EN_LINES, 4, 20) + zh[:10])
    path = prepare_config(write_config, [raw])
    result = invoke("prepare", path)
    assert result.exit_code == 0, result.output
    corpus = tmp_path / "runs" / "t" / "corpus"
    stats = json.loads((corpus / "stats.json").read_text(encoding="utf-8"))
    funnel = {row["step"]: row for row in stats["funnel"]}
    assert funnel["read"]["documents"] == 90
    assert funnel["language"]["removed"] >= 19  # the English blocks
    # every copy whose original passed the filters is removed (some failed a quality filter)
    assert funnel["exact"]["removed"] >= 5
    rows = kept_rows(tmp_path)
    assert len(rows) == stats["kept"]["documents"] > 40
    assert len({r["text"] for r in rows}) == len(rows)  # no copy left
    assert all(r["id"].startswith(str(raw)) and r["source"] == str(raw) for r in rows)
    assert sum(stats["lid"]["score_histogram"]["counts"]) == 90
    assert (corpus / "removed" / "language-language.jsonl").exists()
    assert "prepare: filter: 90 documents" in result.output
    again = invoke("prepare", path)
    assert "already done" in again.output


@pytest.mark.slow
def test_run_trains_on_the_prepared_corpus_and_marks_the_heldout_documents(write_config, tmp_path):
    raw = write_text(tmp_path / "raw.txt", blocks(ZH_LINES, 5, 200))
    path = write_config(
        data={"heldout_fraction": 0.1},
        prepare={"inputs": [str(raw)], "language": "cmn_Hant", "executor": {"workers": 1}},
        tokenize={"merge": False, "vocab_size": 1500, "holdout_lines": 10, "num_threads": 1},
        init={"size": "tiny"},
        pretrain={
            "full": {"steps": 2},
            "block_size": 32,
            "batch_size": 2,
            "eval_every": 2,
            "save_every": 2,
            "max_eval_blocks": 2,
            "energy": {"enabled": False},
        },
    )
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "t"
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["stages"]["prepare"]["status"] == "done"
    assert "parent:prepare" in manifest["stages"]["tokenize"]["inputs"]
    assert manifest["stages"]["pretrain-full"]["status"] == "done"
    assert "parent:prepare" in manifest["stages"]["pretrain-full"]["inputs"]
    heldout_docs = [r["text"] for r in kept_rows(tmp_path) if r["heldout"]]
    assert heldout_docs
    heldout_lines = (run_dir / "tokenizer" / "heldout.txt").read_text(encoding="utf-8")
    assert heldout_lines.split("\n")[0] in "\n".join(heldout_docs)
    # a changed input makes prepare stale, and tokenize with it
    write_text(raw, blocks(ZH_LINES, 5, 199))
    status = invoke("status", path)
    assert "prepare" in status.output and "stale" in status.output


def test_jsonl_parquet_and_warc_inputs_keep_ids_and_fields(write_config, tmp_path):
    zh = blocks(ZH_LINES, 6, 12)
    jsonl = tmp_path / "a.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as handle:
        for i, text in enumerate(zh[:6]):
            handle.write(json.dumps({"id": f"doc-{i}", "body": text, "url": f"u{i}"}) + "\n")
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": zh[6:], "topic": ["help"] * 6}), parquet)
    warc = _warc(tmp_path / "c.warc.gz", zh[0].replace("\n", "</p><p>") + "<p>額外的一行文字。</p>")
    path = prepare_config(write_config, [jsonl, parquet, warc], text_field="body")
    result = invoke("prepare", path)
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in kept_rows(tmp_path)}
    assert {"doc-0", f"{parquet.resolve()}:0"} <= set(rows)
    assert json.loads(rows["doc-0"]["metadata"])["url"] == "u0"
    assert json.loads(rows[f"{parquet.resolve()}:0"]["metadata"])["topic"] == "help"


def _warc(path, html_body: str):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    html = f"<html><head><title>t</title></head><body><article><p>{html_body}</p></article>"
    html += "</body></html>"
    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.0")
        record = writer.create_warc_record(
            "http://example.com/a",
            "response",
            payload=__import__("io").BytesIO(html.encode("utf-8")),
            http_headers=headers,
            warc_headers_dict={"WARC-Identified-Payload-Type": "text/html"},
        )
        writer.write_record(record)
    return path


def test_planted_benchmark_questions_are_removed_and_counted(write_config, tmp_path):
    clean = blocks(ZH_LINES, 6, 40)
    questions = [line for line in ZH_LINES[2000:2400] if len(line) >= 40][:8]
    mc = tmp_path / "quiz.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"question": q, "A": "甲", "B": "乙", "C": "丙", "D": "丁", "answer": "A"})
            + "\n"
            for q in questions
        ),
        encoding="utf-8",
    )
    planted = [f"{doc}\n{q}\nA. 甲\nB. 乙" for doc, q in zip(clean[:8], questions, strict=True)]
    raw = write_text(tmp_path / "raw.txt", clean[8:] + planted)
    eval_section = {"eval": {"tasks": [{"name": "mc", "path": str(mc)}]}}
    path = prepare_config(write_config, [raw], sections=eval_section)
    result = invoke("prepare", path)
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "runs/t/corpus/stats.json").read_text(encoding="utf-8"))
    assert stats["decontamination"]["removed"] == {"mc-quiz": 8}
    assert stats["decontamination"]["unit"] == "characters"
    assert not any(q in r["text"] for r in kept_rows(tmp_path) for q in questions)
    report = invoke("report", path)
    assert report.exit_code == 0, report.output
    html = (tmp_path / "runs/t/report.html").read_text(encoding="utf-8")
    assert "Corpus preparation" in html and "mc-quiz" in html and "Removed documents" in html


def test_calibration_loosens_thresholds_to_keep_clean_text(write_config, tmp_path):
    raw = write_text(tmp_path / "raw.txt", blocks(ZH_LINES, 6, 80))
    reference = write_text(tmp_path / "clean.txt", blocks(ZH_LINES, 6, 150, start=1000))
    plain = invoke("prepare", prepare_config(write_config, [raw]))
    assert plain.exit_code == 0, plain.output
    before = len(kept_rows(tmp_path))
    path = prepare_config(write_config, [raw], calibrate_from=[str(reference)])
    result = invoke("prepare", path)
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "runs/t/corpus/stats.json").read_text(encoding="utf-8"))
    assert stats["calibration"]["documents"] == 150 and stats["calibration"]["changed"]
    assert len(kept_rows(tmp_path)) > before


def test_pii_is_replaced(write_config, tmp_path):
    docs = blocks(ZH_LINES, 6, 20)
    docs[0] += "\n聯絡我們：someone.real@gmail.com 或 8.8.4.4。"
    path = prepare_config(write_config, [write_text(tmp_path / "raw.txt", docs)])
    assert invoke("prepare", path).exit_code == 0
    text = "\n".join(r["text"] for r in kept_rows(tmp_path))
    assert "someone.real@gmail.com" not in text and "8.8.4.4" not in text


# ----- bad input: one line, exit 1, nothing written ------------------------------------------


def _refused(result, *words):
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in errors[0], errors[0]


def _nothing_written(tmp_path):
    run_dir = tmp_path / "runs" / "t"
    assert not (run_dir / "corpus").exists()
    assert not list(run_dir.glob(".prepare-work-*"))


@pytest.fixture
def raw(tmp_path):
    return write_text(tmp_path / "raw.txt", blocks(ZH_LINES, 6, 20))


def test_unknown_language_code_suggests_the_nearest(write_config, raw, tmp_path):
    _refused(invoke("prepare", prepare_config(write_config, [raw], language="pt_Latn")), "por_Latn")
    _nothing_written(tmp_path)


def test_missing_and_corrupt_lid_models_are_refused(write_config, raw, tmp_path):
    missing = prepare_config(write_config, [raw], lid={"model": str(tmp_path / "none.bin")})
    _refused(invoke("prepare", missing), "none.bin")
    corrupt = tmp_path / "lid.bin"
    corrupt.write_bytes(b"not a fasttext model" * 10)
    _refused(
        invoke("prepare", prepare_config(write_config, [raw], lid={"model": str(corrupt)})),
        "corrupt",
    )
    _nothing_written(tmp_path)


def test_a_corrupt_input_file_stops_the_stage_or_is_skipped(write_config, raw, tmp_path):
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"text": "x"}\n' * 50)[:40])
    _refused(invoke("prepare", prepare_config(write_config, [raw, broken])), "broken.jsonl.gz")
    _nothing_written(tmp_path)
    result = invoke("prepare", prepare_config(write_config, [raw, broken], bad_files="skip"))
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "runs/t/corpus/stats.json").read_text(encoding="utf-8"))
    assert [b["file"] for b in stats["inputs"]["bad_files"]] == [str(broken.resolve())]


def test_invalid_utf8_is_counted(write_config, tmp_path):
    raw = tmp_path / "raw.txt"
    text = "\n\n".join(blocks(ZH_LINES, 6, 20)).encode("utf-8")
    raw.write_bytes(text + b"\n\n\xff\xfe broken line\n")
    result = invoke("prepare", prepare_config(write_config, [raw]))
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "runs/t/corpus/stats.json").read_text(encoding="utf-8"))
    assert stats["inputs"]["invalid_utf8_lines"] == 1


def test_a_missing_text_field_is_named(write_config, tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"content": "文字"}) + "\n", encoding="utf-8")
    _refused(
        invoke("prepare", prepare_config(write_config, [jsonl])), "no text field 'text'", "content"
    )
    _nothing_written(tmp_path)


def test_everything_removed_names_the_step_that_removed_most(write_config, tmp_path):
    english = write_text(tmp_path / "en.txt", blocks(EN_LINES, 4, 20))
    _refused(invoke("prepare", prepare_config(write_config, [english])), "'language' step")
    _nothing_written(tmp_path)


def test_a_language_needing_a_missing_segmenter_is_refused(write_config, raw, tmp_path):
    import importlib.util

    if importlib.util.find_spec("pythainlp") is not None:
        pytest.skip("pythainlp is installed here")
    _refused(
        invoke("prepare", prepare_config(write_config, [raw], language="tha_Thai")),
        "pip install pythainlp",
    )


def test_prepare_without_datatrove_names_the_extra(write_config, raw, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "datatrove" else real(name, *a),
    )
    _refused(invoke("prepare", prepare_config(write_config, [raw])), "lowlm[prepare]")


def test_a_local_hugging_face_dataset_is_read_and_its_text_field_checked(write_config, tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    zh = blocks(ZH_LINES, 6, 12)
    pq.write_table(
        pa.table({"content": zh, "id": [f"row-{i}" for i in range(12)]}), folder / "train.parquet"
    )
    path = prepare_config(write_config, [f"hf:{folder}"], text_field="content")
    result = invoke("prepare", path)
    assert result.exit_code == 0, result.output
    assert {r["id"] for r in kept_rows(tmp_path)} <= {f"row-{i}" for i in range(12)}
    assert kept_rows(tmp_path)
    _refused(
        invoke("prepare", prepare_config(write_config, [f"hf:{folder}"])),
        "no text field 'text'",
        "content",
    )


def test_rehydration_writes_a_document_once_per_cluster_member(write_config, tmp_path):
    zh = blocks(ZH_LINES, 6, 30)
    near = [doc.replace("的", "之", 1) if "的" in doc else doc + "。" for doc in zh[:5]]
    raw = write_text(tmp_path / "raw.txt", zh + near + near)  # 3-member clusters (1 exact)
    path = prepare_config(write_config, [raw], dedup={"rehydrate": True, "max_copies": 5})
    assert invoke("prepare", path).exit_code == 0
    rows = kept_rows(tmp_path)
    sizes = [r["minhash_cluster_size"] for r in rows]
    assert max(sizes) >= 2
    by_text = {}
    for r in rows:
        by_text[r["text"]] = by_text.get(r["text"], 0) + 1
    assert all(by_text[r["text"]] == min(r["minhash_cluster_size"], 5) for r in rows)


def test_sft_test_answers_are_decontaminated_too(write_config, tmp_path):
    docs = blocks(ZH_LINES, 6, 30)
    answer = ZH_LINES[2500] + ZH_LINES[2501]
    sft_test = tmp_path / "sft-test.jsonl"
    sft_test.write_text(json.dumps({"instruction": "問", "output": answer}) + "\n", "utf-8")
    raw = write_text(tmp_path / "raw.txt", docs + [docs[0].replace(ZH_LINES[0], answer)])
    path = prepare_config(write_config, [raw], decontaminate={"sft_test": [str(sft_test)]})
    assert invoke("prepare", path).exit_code == 0
    stats = json.loads((tmp_path / "runs/t/corpus/stats.json").read_text(encoding="utf-8"))
    assert stats["decontamination"]["removed"] == {"sft_test-sft-test": 1}


def test_slurm_and_ray_executors_get_the_configured_resources(tmp_path):
    from lowlm.data.prepare.pipeline import Phase, Runner
    from lowlm.data.prepare.settings import ExecutorConfig
    from lowlm.errors import LowlmError

    slurm = ExecutorConfig(kind="slurm", partition="cpu", time="01:00:00", cpus_per_task=4)
    executor = Runner(slurm, tmp_path)._executor(Phase("filter", [], 8), tmp_path)
    assert type(executor).__name__ == "SlurmPipelineExecutor"
    assert (executor.partition, executor.time, executor.cpus_per_task, executor.tasks) == (
        "cpu",
        "01:00:00",
        4,
        8,
    )
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        with pytest.raises(LowlmError, match=r"datatrove\[ray\]"):
            Runner(ExecutorConfig(kind="ray"), tmp_path)._executor(Phase("filter", [], 8), tmp_path)


def test_tokenize_and_pretrain_read_prepare_only_when_their_corpus_is_unset(write_config, raw):
    from lowlm.config import load_config
    from lowlm.graph import Graph

    prepared = load_config(prepare_config(write_config, [raw]))
    assert Graph(prepared).plan("tokenize").parents == ["prepare"]
    own = load_config(
        write_config(
            prepare={"inputs": [str(raw)], "language": "cmn_Hant"},
            tokenize={"corpus": [str(raw)]},
            pretrain={"full": {"steps": 1}},
            init={"size": "tiny"},
        )
    )
    assert Graph(own).plan("tokenize").parents == []
    assert "prepare" not in Graph(own).plan("pretrain-full").parents


def test_tokenize_and_pretrain_read_prepare_s_text_column_whatever_data_text_field_says(
    write_config, tmp_path
):
    """data.text_field names the users' own field ("content" here); prepare writes `text`."""
    from lowlm.config import load_config
    from lowlm.data.corpus import iter_documents, resolve_sources
    from lowlm.graph import corpus_patterns

    docs = blocks(ZH_LINES, 6, 20)
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"content": d}) + "\n" for d in docs), encoding="utf-8")
    sections = {"data": {"text_field": "content"}}
    path = prepare_config(write_config, [raw], sections, text_field="content")
    assert invoke("prepare", path).exit_code == 0
    config = load_config(path)
    for reader in ("tokenize", "pretrain"):
        sources = resolve_sources(corpus_patterns(config, reader))
        assert [s.path.suffix for s in sources] == [".parquet"]
        read = list(iter_documents(sources, config.data))
        assert read == [r["text"] for r in kept_rows(tmp_path)] and len(read) >= 15


def test_the_demo_prepares_its_raw_sample_offline(tmp_path):
    from .conftest import REPO

    result = invoke("prepare", REPO / "configs" / "demo.yaml", "--set", f"run.root={tmp_path}")
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "demo/corpus/stats.json").read_text(encoding="utf-8"))
    funnel = {row["step"]: row for row in stats["funnel"]}
    assert funnel["read"]["documents"] == 205
    assert funnel["language"]["removed"] >= 20 and funnel["exact"]["removed"] >= 10


def test_progress_lines_report_tasks_documents_and_megabytes(tmp_path, capsys):
    import time

    from datatrove.pipeline.base import PipelineStep

    from lowlm.data.prepare.inputs import resolve_inputs
    from lowlm.data.prepare.pipeline import Runner
    from lowlm.data.prepare.readers import InputReader
    from lowlm.data.prepare.settings import ExecutorConfig

    class Slow(PipelineStep):
        name = "slow"

        def run(self, data, rank=0, world_size=1):
            for doc in data:
                time.sleep(0.002)
                yield doc

    files, _ = resolve_inputs([str(DEMO / "raw-sample.jsonl"), str(DEMO / "en.txt")])
    reader = InputReader(files, "text", "lines", str(tmp_path / "bad"))
    runner = Runner(ExecutorConfig(workers=1), tmp_path, progress_every=0.2)
    runner.run("filter", [reader, Slow()], 2, [111_453, 113_038])
    lines = capsys.readouterr().out.splitlines()
    assert "prepare: filter: 1 of 2 tasks done, 205 documents, 0.1 MB" in "\n".join(lines)


def test_warc_inputs_without_trafilatura_name_the_extra(write_config, tmp_path, monkeypatch):
    import importlib.util

    warc = _warc(tmp_path / "c.warc.gz", "<p>文字</p>")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "trafilatura" else real(name, *a),
    )
    _refused(
        invoke("prepare", prepare_config(write_config, [warc])),
        "trafilatura",
        "datatrove[io,processing]",
    )
    _nothing_written(tmp_path)
