"""Multiple-choice benchmarks: their files, subjects, categories and prompts.

Prompts follow EleutherAI's lm-evaluation-harness task configs exactly (its default
`mmlu`, `ceval-valid`, `cmmlu` and `tmmluplus` tasks): a per-subject description, then
`first_n` few-shot examples from the few-shot split joined by "\\n\\n", then the question;
the continuations are " A" ... " D".
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowlm.data.records import read_csv_text
from lowlm.errors import LowlmError
from lowlm.hub import unreachable_note

LETTERS = ("A", "B", "C", "D")


@dataclass
class Question:
    subject: str
    index: int  # 0-based position among the rows of its source file and split
    question: str
    choices: list[str]
    answer: str  # the gold letter ("" where the split has no public answers)
    key: str | None = None  # the row's id column, where the release has one (C-Eval)


MMLU_CATEGORIES = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}

# C-Eval: subject -> (Chinese name, category), from the C-Eval release.
CEVAL_SUBJECTS = {
    "computer_network": ("计算机网络", "stem"),
    "operating_system": ("操作系统", "stem"),
    "computer_architecture": ("计算机组成", "stem"),
    "college_programming": ("大学编程", "stem"),
    "college_physics": ("大学物理", "stem"),
    "college_chemistry": ("大学化学", "stem"),
    "advanced_mathematics": ("高等数学", "stem"),
    "probability_and_statistics": ("概率统计", "stem"),
    "discrete_mathematics": ("离散数学", "stem"),
    "electrical_engineer": ("注册电气工程师", "stem"),
    "metrology_engineer": ("注册计量师", "stem"),
    "high_school_mathematics": ("高中数学", "stem"),
    "high_school_physics": ("高中物理", "stem"),
    "high_school_chemistry": ("高中化学", "stem"),
    "high_school_biology": ("高中生物", "stem"),
    "middle_school_mathematics": ("初中数学", "stem"),
    "middle_school_biology": ("初中生物", "stem"),
    "middle_school_physics": ("初中物理", "stem"),
    "middle_school_chemistry": ("初中化学", "stem"),
    "veterinary_medicine": ("兽医学", "stem"),
    "college_economics": ("大学经济学", "social_sciences"),
    "business_administration": ("工商管理", "social_sciences"),
    "marxism": ("马克思主义基本原理", "social_sciences"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "social_sciences"),
    "education_science": ("教育学", "social_sciences"),
    "teacher_qualification": ("教师资格", "social_sciences"),
    "high_school_politics": ("高中政治", "social_sciences"),
    "high_school_geography": ("高中地理", "social_sciences"),
    "middle_school_politics": ("初中政治", "social_sciences"),
    "middle_school_geography": ("初中地理", "social_sciences"),
    "modern_chinese_history": ("近代史纲要", "humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "humanities"),
    "logic": ("逻辑学", "humanities"),
    "law": ("法学", "humanities"),
    "chinese_language_and_literature": ("中国语言文学", "humanities"),
    "art_studies": ("艺术学", "humanities"),
    "professional_tour_guide": ("导游资格", "humanities"),
    "legal_professional": ("法律职业资格", "humanities"),
    "high_school_chinese": ("高中语文", "humanities"),
    "high_school_history": ("高中历史", "humanities"),
    "middle_school_history": ("初中历史", "humanities"),
    "civil_servant": ("公务员", "other"),
    "sports_science": ("体育学", "other"),
    "plant_protection": ("植物保护", "other"),
    "basic_medicine": ("基础医学", "other"),
    "clinical_medicine": ("临床医学", "other"),
    "urban_and_rural_planner": ("注册城乡规划师", "other"),
    "accountant": ("注册会计师", "other"),
    "fire_engineer": ("注册消防工程师", "other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "other"),
    "tax_accountant": ("税务师", "other"),
    "physician": ("医师资格", "other"),
}

# CMMLU: subject -> (Chinese name, category), categories as in the CMMLU release.
CMMLU_SUBJECTS = {
    "agronomy": ("农学", "other"),
    "anatomy": ("解剖学", "stem"),
    "ancient_chinese": ("古汉语", "china_specific"),
    "arts": ("艺术学", "humanities"),
    "astronomy": ("天文学", "stem"),
    "business_ethics": ("商业伦理", "social_sciences"),
    "chinese_civil_service_exam": ("中国公务员考试", "china_specific"),
    "chinese_driving_rule": ("中国驾驶规则", "china_specific"),
    "chinese_food_culture": ("中国饮食文化", "china_specific"),
    "chinese_foreign_policy": ("中国外交政策", "china_specific"),
    "chinese_history": ("中国历史", "china_specific"),
    "chinese_literature": ("中国文学", "china_specific"),
    "chinese_teacher_qualification": ("中国教师资格", "china_specific"),
    "clinical_knowledge": ("临床知识", "other"),
    "college_actuarial_science": ("大学精算学", "stem"),
    "college_education": ("大学教育学", "social_sciences"),
    "college_engineering_hydrology": ("大学工程水文学", "stem"),
    "college_law": ("大学法律", "humanities"),
    "college_mathematics": ("大学数学", "stem"),
    "college_medical_statistics": ("大学医学统计", "stem"),
    "college_medicine": ("大学医学", "other"),
    "computer_science": ("计算机科学", "stem"),
    "computer_security": ("计算机安全", "other"),
    "conceptual_physics": ("概念物理学", "stem"),
    "construction_project_management": ("建设工程管理", "china_specific"),
    "economics": ("经济学", "social_sciences"),
    "education": ("教育学", "social_sciences"),
    "electrical_engineering": ("电气工程", "stem"),
    "elementary_chinese": ("小学语文", "china_specific"),
    "elementary_commonsense": ("小学常识", "china_specific"),
    "elementary_information_and_technology": ("小学信息技术", "other"),
    "elementary_mathematics": ("初等数学", "stem"),
    "ethnology": ("民族学", "china_specific"),
    "food_science": ("食品科学", "other"),
    "genetics": ("遗传学", "stem"),
    "global_facts": ("全球事实", "humanities"),
    "high_school_biology": ("高中生物", "stem"),
    "high_school_chemistry": ("高中化学", "stem"),
    "high_school_geography": ("高中地理", "social_sciences"),
    "high_school_mathematics": ("高中数学", "stem"),
    "high_school_physics": ("高中物理学", "stem"),
    "high_school_politics": ("高中政治", "china_specific"),
    "human_sexuality": ("人类性行为", "other"),
    "international_law": ("国际法学", "humanities"),
    "journalism": ("新闻学", "social_sciences"),
    "jurisprudence": ("法理学", "humanities"),
    "legal_and_moral_basis": ("法律与道德基础", "other"),
    "logical": ("逻辑学", "humanities"),
    "machine_learning": ("机器学习", "stem"),
    "management": ("管理学", "social_sciences"),
    "marketing": ("市场营销", "social_sciences"),
    "marxist_theory": ("马克思主义理论", "humanities"),
    "modern_chinese": ("现代汉语", "china_specific"),
    "nutrition": ("营养学", "other"),
    "philosophy": ("哲学", "humanities"),
    "professional_accounting": ("专业会计", "social_sciences"),
    "professional_law": ("专业法学", "humanities"),
    "professional_medicine": ("专业医学", "other"),
    "professional_psychology": ("专业心理学", "social_sciences"),
    "public_relations": ("公共关系", "social_sciences"),
    "security_study": ("安全研究", "social_sciences"),
    "sociology": ("社会学", "social_sciences"),
    "sports_science": ("体育学", "other"),
    "traditional_chinese_medicine": ("中医中药", "china_specific"),
    "virology": ("病毒学", "stem"),
    "world_history": ("世界历史", "humanities"),
    "world_religions": ("世界宗教", "humanities"),
}

# TMMLU+: subject -> (Traditional Chinese name, fine category), from the TMMLU+ release.
_TMMLU_FINE_TO_CATEGORY = {
    "physics": "stem",
    "chemistry": "stem",
    "biology": "stem",
    "computer science": "stem",
    "math": "stem",
    "engineering": "stem",
    "history": "humanities",
    "philosophy": "humanities",
    "law": "humanities",
    "politics": "social_sciences",
    "culture": "social_sciences",
    "economics": "social_sciences",
    "geography": "social_sciences",
    "psychology": "social_sciences",
    "education": "social_sciences",
    "other": "other",
    "business": "other",
    "health": "other",
}
_TMMLU_TABLE = """dentistry 牙醫學 health
traditional_chinese_medicine_clinical_medicine 中醫臨床醫學 health
clinical_psychology 臨床心理學 psychology
technical 技術工相關 other
culinary_skills 餐旅 other
mechanical 機械與機電概論 other
logic_reasoning 邏輯思維 other
real_estate 房地產 other
general_principles_of_law 法學大意 law
finance_banking 金融與法規 business
anti_money_laundering 洗錢防制 law
ttqav2 台灣在地用語 culture
marketing_management 行銷管理 other
business_management 企業管理 other
organic_chemistry 有機化學 chemistry
advance_chemistry 化學 chemistry
physics 物理 physics
secondary_physics 高中物理 physics
human_behavior 人類行為與社會 psychology
national_protection 軍事 politics
jce_humanities 指考人文科目 philosophy
linear_algebra 線代 math
politic_science 政治 politics
agriculture 農業 other
official_document_management 機關文書 other
financial_analysis 財務分析 business
pharmacy 藥劑學 biology
educational_psychology 教育心理 psychology
statistics_and_machine_learning 統計與機器學習 engineering
management_accounting 管理會計 business
introduction_to_law 法律概論 law
computer_science 資訊工程 computer_science
veterinary_pathology 獸醫病理學 health
accounting 會計學 business
fire_science 火災學 other
optometry 視光學 other
insurance_studies 保險學 other
pharmacology 藥理學 health
taxation 稅務 law
education_(profession_level) 教育專業 education
economics 經濟學 economics
veterinary_pharmacology 獸醫藥理學 health
nautical_science 航海 other
occupational_therapy_for_psychological_disorders 心理障礙職能治療學 psychology
trust_practice 信託實務 law
geography_of_taiwan 台灣地理 geography
physical_education 體育 education
auditing 審計學 business
administrative_law 行政法 law
basic_medical_science 基礎醫學 biology
macroeconomics 總經 economics
trade 貿易 business
chinese_language_and_literature 國文 culture
tve_design 統測＿設計 other
junior_science_exam 國中會考基測自然科 biology
junior_math_exam 國中會考基測數學科 math
junior_chinese_exam 國中會考基測國文 culture
junior_social_studies 國中會考基測社會科 other
tve_mathematics 統測數學 math
tve_chinese_language 統測國文 culture
tve_natural_sciences 統測自然科 biology
junior_chemistry 國中理化 chemistry
music 音樂科 other
education 教育常識 education
three_principles_of_people 三民主義 culture
taiwanese_hokkien 閩南語 culture
engineering_math 工程數學 math"""
TMMLU_SUBJECTS = {
    subject: (name, _TMMLU_FINE_TO_CATEGORY[fine.replace("_", " ")])
    for subject, name, fine in (line.split(" ") for line in _TMMLU_TABLE.splitlines())
}


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark is laid out, described and prompted."""

    name: str
    subjects: dict[str, str]  # subject -> category
    default_split: str
    fewshot_split: str
    hf_dataset: str
    description: Callable[[str], str]
    answer_cue: str  # the end of every question: "Answer:" or "答案："
    file_pattern: str  # path of a subject's file, relative to the release root
    has_header: bool


BENCHMARKS = {
    "mmlu": Benchmark(
        "mmlu",
        MMLU_CATEGORIES,
        "test",
        "dev",
        "cais/mmlu",
        lambda s: (
            f"The following are multiple choice questions (with answers) about "
            f"{s.replace('_', ' ')}.\n\n"
        ),
        "Answer:",
        "{split}/{subject}_{split}.csv",
        False,
    ),
    "ceval": Benchmark(
        "ceval",
        {k: v[1] for k, v in CEVAL_SUBJECTS.items()},
        "val",
        "dev",
        "ceval/ceval-exam",
        lambda s: f"以下是中国关于{CEVAL_SUBJECTS[s][0]}的单项选择题，请选出其中的正确答案。\n\n",
        "答案：",
        "{split}/{subject}_{split}.csv",
        True,
    ),
    "cmmlu": Benchmark(
        "cmmlu",
        {k: v[1] for k, v in CMMLU_SUBJECTS.items()},
        "test",
        "dev",
        "haonan-li/cmmlu",
        lambda s: f"以下是关于{CMMLU_SUBJECTS[s][0]}的单项选择题，请直接给出正确答案的选项。\n\n",
        "答案：",
        "{split}/{subject}.csv",
        True,
    ),
    "tmmluplus": Benchmark(
        "tmmluplus",
        {k: v[1] for k, v in TMMLU_SUBJECTS.items()},
        "test",
        "train",
        "ikala/tmmluplus",
        lambda s: (
            f"以下為{TMMLU_SUBJECTS[s][0].replace('＿', ' ')}的單選題，請提供正確答案的選項。\n\n"
        ),
        "Answer:",
        "{subject}_{split}.csv",
        True,
    ),
}


def question_text(q: Question, answer_cue: str) -> str:
    """The harness's doc_to_text: the stripped question, the four options, the cue."""
    options = "".join(
        f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True)
    )
    return f"{q.question.strip()}{options}\n{answer_cue}"


def build_context(
    description: str, shots: list[Question], question: Question, answer_cue: str
) -> str:
    """description + first-n examples (each with " X"), joined by blank lines, + the question."""
    examples = "".join(f"{question_text(s, answer_cue)} {s.answer}\n\n" for s in shots)
    return f"{description}{examples}{question_text(question, answer_cue)}"


def _root(path: Path, benchmark: Benchmark, split: str) -> Path:
    """The release root: the folder itself, or its data/ subfolder (MMLU's tarball layout)."""
    for candidate in (path, path / "data"):
        if (candidate / split).is_dir() or list(candidate.glob(f"*_{split}.csv")):
            return candidate
    raise LowlmError(
        f"{path} does not look like the {benchmark.name} release layout (no '{split}' split "
        f"found as {benchmark.file_pattern.format(split=split, subject='<subject>')})."
    )


REQUIRED_COLUMNS = ("question", "a", "b", "c", "d", "answer")


def _parse_rows(
    path: Path, benchmark: Benchmark, subject: str, answers: bool = True
) -> list[Question]:
    """The questions of one subject file. Every row becomes a question or stops the run with
    file, line and what is wrong: a score never silently covers fewer rows than the file."""
    rows = list(csv.reader(io.StringIO(read_csv_text(path))))
    header = [h.strip().lower() for h in rows[0]] if benchmark.has_header and rows else None
    if header is not None:
        missing = [c for c in REQUIRED_COLUMNS if c not in header and (answers or c != "answer")]
        if missing:
            raise LowlmError(
                f"{path}:1: no column {', '.join(missing)} in the header ({', '.join(rows[0])}); "
                f"{benchmark.name} files need question, A, B, C, D and answer columns."
            )
        extra = [h for h in header if len(h) == 1 and "e" <= h <= "z"]
        if extra:
            raise LowlmError(
                f"{path}:1: choice column {extra[0].upper()} beyond A-D; {benchmark.name} is "
                "scored on four choices as lm-evaluation-harness does, so lowlm will not drop "
                "it: remove the column, or score the file as an `mc` task with its choices."
            )
    body = rows[1:] if header else rows
    questions = []
    for offset, row in enumerate(body):
        line = offset + (2 if header else 1)
        if header:
            record = dict(zip(header, row, strict=False))
            if len(row) != len(header):
                raise LowlmError(
                    f"{path}:{line}: {len(row)} columns where the header has {len(header)}; "
                    "fix the row."
                )
            values = [record.get("question", ""), *(record.get(x.lower(), "") for x in LETTERS)]
            answer = record.get("answer", "").strip()
            key = record.get("id")
        else:
            if len(row) != 6:
                raise LowlmError(
                    f"{path}:{line}: {len(row)} columns, expected 6 (question,A,B,C,D,answer)."
                )
            values, answer, key = row[:5], row[5].strip(), None
        if not values[0].strip():
            raise LowlmError(f"{path}:{line}: the question is empty; fix or remove the row.")
        if answers and answer not in LETTERS:
            raise LowlmError(f"{path}:{line}: answer {answer!r} is not one of A, B, C, D.")
        questions.append(Question(subject, offset, values[0], list(values[1:5]), answer, key))
    return questions


def load_local(
    benchmark: Benchmark, path: Path, subject: str, split: str, answers: bool = True
) -> list[Question]:
    root = _root(path, benchmark, split)
    file = root / benchmark.file_pattern.format(split=split, subject=subject)
    if not file.exists():
        raise LowlmError(f"{benchmark.name}: subject file {file} is missing.")
    return _parse_rows(file, benchmark, subject, answers)


def local_subjects(benchmark: Benchmark, path: Path, split: str) -> list[str]:
    """The subjects present in a local release (known subjects first, in release order)."""
    root = _root(path, benchmark, split)
    present = []
    for subject in benchmark.subjects:
        if (root / benchmark.file_pattern.format(split=split, subject=subject)).exists():
            present.append(subject)
    if not present:
        raise LowlmError(f"{path}: no {benchmark.name} subject file for split '{split}'.")
    return present


def load_hub(
    benchmark: Benchmark, subject: str, split: str, answers: bool = True
) -> list[Question]:
    """The same questions from the Hugging Face copy of the benchmark (needs a connection)."""
    note = unreachable_note()  # before datasets: fail at once offline
    import datasets

    hub_split = {"val": "validation"}.get(split, split) if benchmark.name == "tmmluplus" else split
    try:
        rows = datasets.load_dataset(benchmark.hf_dataset, subject, split=hub_split)
    except Exception as exc:  # the hub raises many kinds; all mean "not available"
        raise LowlmError(
            f"cannot load {benchmark.hf_dataset} ({subject}, {split}) from the Hugging Face Hub "
            f"({type(exc).__name__}){note}; set the task's path to a local copy."
        ) from None
    questions = []
    for index, row in enumerate(rows):
        if "choices" in row:  # cais/mmlu
            choices, answer = list(row["choices"]), LETTERS[int(row["answer"])]
        else:
            choices = [row[letter] for letter in LETTERS]
            answer = str(row.get("answer", row.get("Answer", ""))).strip()
        question = row.get("question", row.get("Question", ""))
        if not isinstance(question, str) or not question.strip():
            raise LowlmError(
                f"{benchmark.hf_dataset} ({subject}, {split}) row {index}: no question text."
            )
        if answers and answer not in LETTERS:
            raise LowlmError(
                f"{benchmark.hf_dataset} ({subject}, {split}) row {index}: answer {answer!r} is "
                "not one of A, B, C, D."
            )
        key = str(row["id"]) if "id" in row else None
        questions.append(Question(subject, index, question, choices, answer, key))
    return questions
