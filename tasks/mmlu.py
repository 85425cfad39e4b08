"""
MMLU: 57 subjects of 4-way multiple choice.

Local layout: eval/mmlu/{dev,test}/<subject>_<split>.csv with the header
question,choice0,choice1,choice2,choice3,answer (answer an int 0-3).
The "auxiliary_train" split is not in the shared data; pass `path=` to a CSV file (or a folder of them)
in either that layout or the original header-less Hendrycks one (question, 4 choices, answer letter).
"""
import csv
import os

from tasks.common import MultipleChoiceTask, data_path, mc_conversation, LETTERS

SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)
SPLITS = ("dev", "test", "auxiliary_train")
HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def read_mmlu_csv(path, subject):
    """Rows (question, [4 choices], gold index, subject) from one CSV in either layout."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, rec in enumerate(csv.reader(f), 1):
            if not rec or (lineno == 1 and [c.strip() for c in rec] == HEADER):
                continue
            if len(rec) != 6:
                raise ValueError(f"{path}:{lineno}: expected 6 columns (question, 4 choices, answer), got {len(rec)}")
            answer = rec[5].strip()
            if answer not in ("0", "1", "2", "3", "A", "B", "C", "D"):
                raise ValueError(f"{path}:{lineno}: answer must be 0-3 or A-D, got {answer!r}")
            rows.append((rec[0], rec[1:5], int(answer) if answer.isdigit() else LETTERS.index(answer), subject))
    return rows


def _subject_of(filename, split):
    return filename.removesuffix(".csv").removesuffix(f"_{split}")


class MMLU(MultipleChoiceTask):
    def __init__(self, split="test", subject=None, path=None, **kwargs):
        """`subject` (one of SUBJECTS) restricts to one subject; `path` overrides the split's folder or file."""
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"MMLU split must be one of {SPLITS}, got {split!r}")
        if subject is not None and subject not in SUBJECTS:
            raise ValueError(f"unknown MMLU subject {subject!r}; see tasks.mmlu.SUBJECTS")
        if split == "auxiliary_train" and path is None:
            raise FileNotFoundError(
                "MMLU auxiliary_train is not in the shared data; download it yourself (e.g. the Hendrycks "
                "'auxiliary_train' CSVs) and pass MMLU(split='auxiliary_train', path=FILE_OR_FOLDER)")
        self.split = split
        self.path = data_path("eval", "mmlu", split, path=path, what=f"MMLU {split} data")
        if os.path.isdir(self.path):
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".csv"))
            missing = [s for s in SUBJECTS if f"{s}_{split}.csv" not in files]
            if missing and subject is None and split != "auxiliary_train":
                raise FileNotFoundError(f"MMLU {split}: {len(missing)} subject files missing in {self.path}, "
                                        f"e.g. {missing[0]}_{split}.csv")
            if subject is not None:
                files = [f for f in files if _subject_of(f, split) == subject]
                if not files:
                    raise FileNotFoundError(f"MMLU {split}: no CSV for subject {subject!r} in {self.path}")
            paths = [os.path.join(self.path, f) for f in files]
        else:
            paths = [self.path]
        self.rows = [row for p in paths for row in read_mmlu_csv(p, subject or _subject_of(os.path.basename(p), split))]

    def get_example(self, index):
        question, choices, gold, subject = self.rows[index]
        return mc_conversation(question, choices, gold, subject=subject)
