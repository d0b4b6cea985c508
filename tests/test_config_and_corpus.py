"""The config contract and the corpus reader shared by every stage."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lowlm.config import DataConfig, load_config
from lowlm.data.corpus import iter_documents, resolve_sources
from lowlm.errors import LowlmError
from lowlm.rundir import atomic_dir, atomic_write_text


def test_unknown_key_is_named_with_the_closest_valid_key(write_config):
    path = write_config(tokenize={"vocab_szie": 100})
    with pytest.raises(
        LowlmError, match=r"unknown key 'tokenize.vocab_szie'.*did you mean 'vocab_size'"
    ):
        load_config(path)


def test_unknown_section_is_named(write_config):
    path = write_config(tokenzie={"vocab_size": 100})
    with pytest.raises(LowlmError, match=r"unknown key 'tokenzie'.*did you mean 'tokenize'"):
        load_config(path)


def test_wrong_type_names_the_field_and_the_expected_type(write_config):
    with pytest.raises(LowlmError, match=r"'tokenize.vocab_size' must be an integer, got 'lots'"):
        load_config(write_config(tokenize={"vocab_size": "lots"}))
    with pytest.raises(LowlmError, match=r"'tokenize.model_type' must be 'bpe' or 'unigram'"):
        load_config(write_config(tokenize={"model_type": "wordpiece"}))


def test_set_overrides_parse_yaml_values(write_config):
    path = write_config(tokenize={"vocab_size": 100})
    config = load_config(
        path, ["tokenize.vocab_size=321", "tokenize.scripts=[Han, Latin]", "run.name=other"]
    )
    assert config.tokenize.vocab_size == 321
    assert config.tokenize.scripts == ["Han", "Latin"]
    assert config.run_dir.name == "other"
    with pytest.raises(LowlmError, match="not of the form"):
        load_config(path, ["tokenize.vocab_size"])


def test_missing_and_malformed_config_files_are_clear(tmp_path):
    with pytest.raises(LowlmError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(LowlmError, match="not valid YAML"):
        load_config(bad)


def test_atomic_dir_leaves_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "artifact"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]
    atomic_write_text(tmp_path / "f.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "f.json"]


def docs(patterns, **options):
    return list(iter_documents(resolve_sources(patterns), DataConfig(**options)))


def test_reads_text_jsonl_gzip_parquet_folders_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("第一行\n第二行\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"content": "甲"}, ensure_ascii=False)
        + "\n\n"
        + json.dumps({"content": "乙"})
        + "\n",
        encoding="utf-8",
    )
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("壓縮\n")
    pq.write_table(pa.table({"content": ["丙", "丁"]}), tmp_path / "d.parquet")
    assert docs([str(tmp_path / "a.txt")]) == ["第一行", "第二行"]
    assert docs([str(tmp_path / "b.jsonl")], text_field="content") == ["甲", "乙"]
    assert docs([str(tmp_path / "c.txt.gz")]) == ["壓縮"]
    assert docs([str(tmp_path / "d.parquet")], text_field="content") == ["丙", "丁"]
    assert docs([str(tmp_path / "*.txt")]) == ["第一行", "第二行"]
    (tmp_path / "b.jsonl").unlink()
    (tmp_path / "d.parquet").unlink()
    assert docs([str(tmp_path)]) == ["第一行", "第二行", "壓縮"]  # a folder: its files, sorted


def test_filters_normalise_deduplicate_and_drop_short_lines(tmp_path):
    (tmp_path / "a.txt").write_text("ｆｕｌｌ\nfull\nab\nfull\n", encoding="utf-8")
    assert docs([str(tmp_path / "a.txt")]) == ["ｆｕｌｌ", "full", "ab", "full"]
    assert docs([str(tmp_path / "a.txt")], nfkc=True, dedup=True, min_chars=3) == ["full"]


def test_invalid_utf8_can_be_replaced_instead(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok\nab\xffcd\n")
    assert docs([str(tmp_path / "bad.txt")], invalid_utf8="replace") == ["ok", "ab\ufffdcd"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(LowlmError, match=r"x.jsonl:2: not valid JSON"):
        docs([str(tmp_path / "x.jsonl")])
    (tmp_path / "y.jsonl").write_text('{"body": "a"}\n', encoding="utf-8")
    with pytest.raises(LowlmError, match=r"y.jsonl:1: no text field 'text'"):
        docs([str(tmp_path / "y.jsonl")])


def test_glob_or_folder_without_files_is_an_error(tmp_path):
    with pytest.raises(LowlmError, match="matches no file"):
        resolve_sources([str(tmp_path / "*.txt")])
    with pytest.raises(LowlmError, match="holds no"):
        resolve_sources([str(tmp_path)])


def test_documents_are_streamed_not_loaded(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("一\n" * 10, encoding="utf-8")
    stream = iter_documents(resolve_sources([str(path)]), DataConfig())
    assert next(stream) == "一"  # a generator: nothing more has been read into a list


def test_hugging_face_dataset_names_are_streamed(monkeypatch):
    import datasets

    calls = {}

    def fake_load_dataset(name, subset, split, streaming):
        calls.update(name=name, subset=subset, split=split, streaming=streaming)
        return iter([{"text": "第一"}, {"text": "第二"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert docs(["hf:someone/corpus:zh-tw"], hf_split="validation") == ["第一", "第二"]
    assert calls == {
        "name": "someone/corpus",
        "subset": "zh-tw",
        "split": "validation",
        "streaming": True,
    }
    assert resolve_sources(["someone/corpus"])[0].hf_name == "someone/corpus"


def test_corpus_inputs_that_once_gave_a_traceback_or_a_silent_drop(tmp_path, monkeypatch):
    broken = tmp_path / "c.txt.gz"
    broken.write_bytes(gzip.compress("壓縮的文字\n".encode() * 200)[:-12])
    with pytest.raises(LowlmError, match=r"c.txt.gz .*is the file complete\?"):
        docs([str(broken)])
    pq.write_table(pa.table({"text": ["甲", None, "乙"]}), tmp_path / "n.parquet")
    with pytest.raises(LowlmError, match=r"n.parquet row 1: column 'text' holds NoneType"):
        docs([str(tmp_path / "n.parquet")])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(LowlmError, match="corpus file 'data/zh-typo' does not exist"):
        resolve_sources(["data/zh-typo"])  # not a Hub dataset: its folder is local
