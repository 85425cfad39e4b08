"""
ARC (AI2 Reasoning Challenge), Easy and Challenge test sets, as multiple choice (4 choices in this data).

Locally only the CORE in-context format exists: eval/core/eval_data/world_knowledge/arc_{easy,challenge}.jsonl
with rows {"query": "Question: ...", "choices": [...], "gold": int}. The question is the query without its
"Question: " prefix (and without a trailing "Answer:" cue, should a copy have one).
"""

from tasks.common import MultipleChoiceTask, data_path, mc_conversation, read_jsonl, LETTERS

SUBSETS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}


def parse_query(query):
    return query.strip().removeprefix("Question:").removesuffix("Answer:").strip()


class ARC(MultipleChoiceTask):
    def __init__(self, subset="ARC-Easy", split="test", path=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {sorted(SUBSETS)}, got {subset!r}")
        if split != "test":
            raise ValueError(f"only the ARC test split is available (CORE format), got split={split!r}")
        self.subset = subset
        rel = ("eval", "core", "eval_data", "world_knowledge", f"{SUBSETS[subset]}.jsonl")
        self.path = data_path(*rel, path=path, what=f"{subset} data")
        self.rows = read_jsonl(self.path, lambda row: (
            isinstance(row.get("query"), str) and isinstance(row.get("choices"), list)
            and isinstance(row.get("gold"), int) and 0 <= row["gold"] < len(row["choices"]) <= len(LETTERS)),
            "{'query': str, 'choices': [...], 'gold': int}")

    def get_example(self, index):
        row = self.rows[index]
        return mc_conversation(parse_query(row["query"]), row["choices"], row["gold"], subset=self.subset)
