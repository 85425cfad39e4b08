"""
HumanEval: 164 Python functions to complete from a signature and docstring, scored in the sandbox
(nanochat/execution.py, check_function): the completed program runs in one sandbox, the problem's `check`
in another (after the prompt, for its helper functions such as HumanEval/32's `poly`), calling the
program's function through a pipe with plain values, and only the tester's token-signed verdict counts --
so a completion that exits, prints "passed" or patches builtins scores as a failure.

The user message is the prompt (signature + docstring); the reference assistant reply is the whole
function (prompt + canonical solution) in a ```python block. A model's reply may be a code block or raw
code, and may hold the whole function or only the body that continues the prompt.
"""
import re

from nanochat.execution import check_function, ensure_sandbox
from tasks.common import Task, data_path, read_jsonl, content_text

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(reply):
    """The code in a reply: the first fenced block that defines a function (else the first fenced block),
    or the whole reply when it has no fence."""
    blocks = _CODE_BLOCK.findall(reply)
    if not blocks:
        return reply
    return next((block for block in blocks if re.search(r"^\s*def ", block, re.MULTILINE)), blocks[0])


def build_program(prompt, completion):
    """The model's program: prompt + completion. A completion with top-level code (a full function, imports) is appended
    after the prompt, whose docstring-only function is valid Python and gets redefined; an indented completion continues
    the prompt's function body. The tests are not part of it: they run in the tester (check_function)."""
    code = extract_code(completion)
    top_level = re.search(r"^(def |import |from |class |@)", code, re.MULTILINE) is not None
    return (prompt + "\n" + code if top_level else prompt + code) + "\n"


class HumanEval(Task):
    def __init__(self, path=None, timeout=5.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout
        self.path = data_path("eval", "humaneval", "HumanEval.jsonl.gz", path=path, what="HumanEval data")
        keys = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
        self.rows = read_jsonl(self.path, lambda row: all(isinstance(row.get(k), str) for k in keys),
                               f"string fields {keys}")
        ensure_sandbox()  # scoring needs the sandbox: say so now (SandboxUnavailable), not mid-evaluation

    def get_example(self, index):
        row = self.rows[index]
        solution = row["prompt"] + row["canonical_solution"]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": f"```python\n{solution}```"}],
                "task_id": row["task_id"], "prompt": row["prompt"], "entry_point": row["entry_point"],
                "test": row["test"]}

    def execute(self, conversation, completion):
        """The sandbox's CheckResult for this completion (`reason` says why a failure failed)."""
        program = build_program(conversation["prompt"], content_text(completion))
        return check_function(program, conversation["entry_point"], conversation["test"],
                              setup=conversation["prompt"], timeout=self.timeout)

    def evaluate(self, conversation, completion):
        """True when the completed function passes all of the problem's tests."""
        return self.execute(conversation, completion).passed
