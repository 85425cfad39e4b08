"""
GSM8K grade-school math word problems (train 7,473, test 1,319).

Rows are {"question", "answer"}; the answer is worked text with calculator annotations <<expr=result>> and a
final line "#### <number>". The assistant turn becomes a list of parts: each annotation turns into a python
tool call (the expression) followed by its output (the result), so the model learns to call the calculator;
the prose around them stays text. Scoring extracts the number after "####" from the completion.
"""
import re

from tasks.common import Task, data_path, read_jsonl, content_text

SPLITS = ("train", "test", "test_socratic")
_ANNOTATION = re.compile(r"<<([^<>]*?)=([^<>=]*)>>")
_FINAL = re.compile(r"####\s*(\$?\s*-?[\d,]*\.?\d+)")


def normalize_number(text):
    """'1,234' -> '1234', '$5' -> '5', '72.00' -> '72', '3.50' -> '3.5'; None if not a number."""
    s = text.strip().replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(text):
    """The normalized number after the last '####' in `text`, or None."""
    matches = _FINAL.findall(text)
    return normalize_number(matches[-1]) if matches else None


def answer_to_parts(answer):
    """GSM8K answer text -> assistant parts: text, {python: expr}, {python_output: result}, text, ...
    (splitting on the annotation's two groups gives exactly that cycle; empty text between them is dropped)."""
    kinds = ("text", "python", "python_output")
    return [{"type": kinds[i % 3], "text": piece} for i, piece in enumerate(_ANNOTATION.split(answer))
            if piece or i % 3]


class GSM8K(Task):
    def __init__(self, split="test", path=None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.path = data_path("eval", "gsm8k", f"{split}.jsonl", path=path, what=f"GSM8K {split} data")
        self.rows = read_jsonl(self.path, lambda row: all(isinstance(row.get(k), str) for k in ("question", "answer")),
                               "{'question': str, 'answer': str}")

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": answer_to_parts(row["answer"])}]}

    def evaluate(self, conversation, completion):
        """1 when the number after '####' in `completion` equals the reference's, else 0."""
        gold = extract_answer(content_text(conversation["messages"][-1]["content"]))
        predicted = extract_answer(completion)
        return int(predicted is not None and predicted == gold)
