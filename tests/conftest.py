"""Tiny tokenizers built inside the test session from the bundled demo text (seconds)."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
ASSETS = Path.home() / ".cache" / "lowlm-assets"
# Launched processes: one thread each (two ranks share the machine's cores).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session", autouse=True)
def _private_hash_cache(tmp_path_factory):
    """Content hashes remembered by the tests stay out of the user's cache."""
    import os

    os.environ["LOWLM_HASH_CACHE"] = str(tmp_path_factory.mktemp("hashes") / "file-hashes.json")


@pytest.fixture(scope="session", autouse=True)
def _loguru_lib_dirs_once():
    """loguru scans every sysconfig scheme on each logger.add (~10 ms), and datatrove adds
    loggers for every task it runs: a fifth of the prepare tests' time. The scan's answer is
    fixed for a process, so it is computed once."""
    try:
        from loguru._better_exceptions import ExceptionFormatter
    except ImportError:  # prepare's extra is not installed
        yield
        return
    scan = ExceptionFormatter.__dict__.get("_get_lib_dirs")
    if not isinstance(scan, staticmethod):  # a loguru without this private scan: leave it
        yield
        return
    ExceptionFormatter._get_lib_dirs = staticmethod(functools.cache(scan.__func__))
    yield
    ExceptionFormatter._get_lib_dirs = scan


@pytest.fixture(scope="session")
def en_lines() -> list[str]:
    return (DEMO / "en.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def zh_lines() -> list[str]:
    return (DEMO / "zh-tw.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def sp_base(tmp_path_factory) -> Path:
    """A Llama-style English SentencePiece BPE (byte fallback, split digits, identity norm)."""
    from lowlm.config import TokenizeConfig
    from lowlm.tokenization.sentencepiece_merge import train_sentencepiece

    folder = tmp_path_factory.mktemp("sp-base")
    cfg = TokenizeConfig(vocab_size=800, num_threads=1)
    return train_sentencepiece(DEMO / "en.txt", folder / "tokenizer", cfg)


@pytest.fixture(scope="session")
def byte_base(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE on English, saved as an HF folder with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(DEMO / "en.txt")], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    hf.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("byte-base")
    hf.save_pretrained(folder)
    return folder


def config_writer(folder: Path):
    """A function writing a config whose run directory lives under folder; returns its path."""

    def write(**sections) -> Path:
        sections.setdefault("run", {})
        sections["run"].setdefault("root", str(folder / "runs"))
        sections["run"].setdefault("name", "t")
        tokenize = sections.setdefault("tokenize", {})
        tokenize.setdefault("num_threads", 1)
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(sections, allow_unicode=True), encoding="utf-8")
        return path

    return write


@pytest.fixture
def write_config(tmp_path):
    """Write a config whose run directory lives under tmp_path; returns its path."""
    return config_writer(tmp_path)


def _save_tiny_llama(folder: Path, sp_model: Path, tied: bool) -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(str(sp_model), add_bos_token=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copyfile(sp_model, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, sp_base) -> Path:
    """A tiny tied Llama over the English SentencePiece base: the 'base model' of the tests."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-base"), sp_base, tied=True)


@pytest.fixture(scope="session")
def tiny_base_untied(tmp_path_factory, sp_base) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-base-untied"), sp_base, tied=False)


def pipeline_config(base: Path | None, **sections) -> dict:
    """A fast pipeline config: a small zh-TW merge and tiny training settings."""
    config = {
        "model": {"base": str(base)} if base else {},
        "data": {"heldout_fraction": 0.05},
        "tokenize": {
            "corpus": [str(DEMO / "zh-tw.txt")],
            "vocab_size": 1500,
            "holdout_lines": 20,
            "merge": base is not None,
        },
        "pretrain": {
            "block_size": 32,
            "batch_size": 2,
            "warmup_steps": 2,
            "log_every": 2,
            "eval_every": 4,
            "save_every": 4,
            "max_eval_blocks": 4,
            "energy": {"enabled": False},
        },
    }
    for section, values in sections.items():
        config.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(config[section].get(key), dict):
                config[section][key].update(value)
            else:
                config[section][key] = value
    return config


def free_port() -> int:
    """A TCP port nothing listens on, for a launcher's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tokenized_runs(tmp_path_factory) -> Path:
    """Where the tokenize outputs built in this session are kept for later runs to copy."""
    return tmp_path_factory.mktemp("tokenized-runs")


def tokenize_once(config, raw: dict, store: Path) -> None:
    """The tokenize stage of `config`, copied from an earlier run of the session whose model,
    tokenize and data sections are these (its manifest and tokenizer folder, file times
    kept) instead of retrained. The stage still decides: it skips only when its key and the
    stamp of the copied folder match, and reruns otherwise."""
    from lowlm.stages import tokenize

    sections = [raw.get(s) for s in ("model", "tokenize", "data")] + [
        raw.get("run", {}).get("seed")
    ]
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()
    saved = store / digest[:16]
    if saved.is_dir():
        config.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(saved / "manifest.json", config.run_dir / "manifest.json")
        shutil.copytree(saved / "tokenizer", config.run_dir / "tokenizer")
    tokenize.run(config)
    if not saved.is_dir():
        partial = store / f".{saved.name}"
        partial.mkdir()
        shutil.copy2(config.run_dir / "manifest.json", partial / "manifest.json")
        shutil.copytree(config.run_dir / "tokenizer", partial / "tokenizer")
        partial.rename(saved)


def make_tiny_run(folder: Path, store: Path, name: str, **pretrain_section) -> Path:
    """Tokenize and init a tiny from-scratch run named NAME under folder/runs, with these
    pretrain settings; returns its config path, folder/NAME.yaml."""
    from lowlm.config import load_config
    from lowlm.stages import init

    raw = pipeline_config(None, init={"size": "tiny"}, pretrain=pretrain_section)
    raw["run"] = {"name": name, "root": str(folder / "runs")}
    raw["tokenize"]["num_threads"] = 1
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    config = load_config(path)
    tokenize_once(config, raw, store)
    init.run(config)
    return path


@pytest.fixture
def make_run(tmp_path, tokenized_runs):
    """make_tiny_run under tmp_path: make(NAME, **pretrain_section) -> config path."""

    def make(name: str, **pretrain_section) -> Path:
        return make_tiny_run(tmp_path, tokenized_runs, name, **pretrain_section)

    return make


@pytest.fixture
def prepare_run(write_config, tokenized_runs):
    """The config of a run whose tokenizer is merged and whose model is resized onto `base`
    (or, base None, initialised)."""
    from lowlm.config import load_config
    from lowlm.stages import init, resize

    def prepare(base: Path | None, **sections):
        raw = pipeline_config(base, **sections)
        config = load_config(write_config(**raw))
        tokenize_once(config, raw, tokenized_runs)
        if base is None:
            init.run(config)
        else:
            resize.run(config)
        return config

    return prepare


# ----- shared by several test modules ---------------------------------------------------


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def report_images(page: str) -> list[bytes]:
    from PIL import Image

    uris = re.findall(r'<img src="([^"]*)"', page)
    images = []
    for uri in uris:
        assert uri.startswith("data:image/png;base64,")
        data = base64.b64decode(uri.split(",", 1)[1], validate=True)
        image = Image.open(io.BytesIO(data)).convert("L")
        low, high = image.getextrema()
        assert image.width > 100 and image.height > 100 and high - low > 100  # a drawn chart
        images.append(data)
    return images


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (make test installs Debian's chromium package)")
    return found


MC_QUESTIONS = [
    ["What is 1 + 1? ", "1", "2", "3", "4", "B"],
    ["Which is a colour?", "red", "dog", "run", "up", "A"],
    ["Pick the vowel.", "b", "c", "e", "d", "C"],
]


def write_harness_task(folder: Path, name: str = "demo_mc", **overrides) -> Path:
    """A multiple-choice harness task over a small jsonl built from the demo text: the
    question is the start of a line, the choices are continuations from four lines."""
    lines = [x for x in (DEMO / "en.txt").read_text(encoding="utf-8").splitlines() if x]
    rows = []
    for i in range(16):
        words = lines[i].split()
        choices = [" ".join(lines[j].split()[5:9]) for j in (i, i + 30, i + 60, i + 90)]
        rows.append({"question": " ".join(words[:5]), "choices": choices, "label": i % 4})
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in part), encoding="utf-8"
        )
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {s: str(folder / f"{s}.jsonl") for s in ("train", "test")}
        },
        "training_split": "train",
        "test_split": "test",
        "fewshot_split": "train",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
        **overrides,
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return path


def run_tokenize(write_config, **tokenize):
    """The tokenize stage on the demo's zh-TW text, English as an eval text."""
    from lowlm.config import load_config
    from lowlm.stages import tokenize as stage

    model = tokenize.pop("model", {})
    tokenize = {
        "corpus": [str(DEMO / "zh-tw.txt")],
        "eval_texts": {"en": str(DEMO / "en.txt")},
        "vocab_size": 1500,
        **tokenize,
    }
    config = load_config(write_config(model=model, tokenize=tokenize))
    report = stage.run(config)
    return config, report, config.run_dir / "tokenizer"


# Built once per session: the tests using them only read the merged tokenizer and its report.
@pytest.fixture(scope="session")
def sp_merged(tmp_path_factory, sp_base):
    """run_tokenize's (config, report, tokenizer folder) of the zh-TW merge onto sp_base."""
    write_config = config_writer(tmp_path_factory.mktemp("sp-merged"))
    return run_tokenize(write_config, model={"tokenizer": str(sp_base)})


@pytest.fixture(scope="session")
def byte_merged(tmp_path_factory, byte_base):
    """run_tokenize's (config, report, tokenizer folder) of the zh-TW merge onto byte_base."""
    write_config = config_writer(tmp_path_factory.mktemp("byte-merged"))
    return run_tokenize(write_config, model={"tokenizer": str(byte_base)}, vocab_size=800)


ZH_LINES = (DEMO / "zh-tw.txt").read_text(encoding="utf-8").splitlines()


EN_LINES = (DEMO / "en.txt").read_text(encoding="utf-8").splitlines()


def blocks(lines: list[str], size: int, count: int, start: int = 0) -> list[str]:
    return ["\n".join(lines[start + i * size : start + (i + 1) * size]) for i in range(count)]


def write_text(path, documents: list[str]):
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def prepare_config(write_config, inputs, sections: dict | None = None, **prepare):
    section = {"inputs": [str(p) for p in inputs], "language": "cmn_Hant"}
    section.setdefault("executor", {"workers": 1})
    section.update(prepare)
    return write_config(prepare=section, **(sections or {}))


def invoke(*args):
    from typer.testing import CliRunner

    from lowlm.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def rendered_dom(chromium: str, page: Path, profile: Path) -> str:
    """The page's DOM after headless Chromium rendered it; fails the test if Chromium failed or
    the page's content-security policy had to block a request."""
    import subprocess

    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr"]
        + ["--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Refused to" not in dom.stderr  # nothing the policy had to block
    return dom.stdout
