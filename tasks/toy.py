"""
A toy task for reinforcement learning tests: the user asks for a letter repeated, and the reward is the
fraction of the reply's letters that are that letter. The reward is dense (any reply scores something
between 0 and 1, so even an untrained model gets a learning signal) and a tiny model can raise it in a few
dozen steps by shifting its replies towards tokens full of the letter. A reply counts as correct (for
pass@k) when at least 40% of its letters are the target.
"""
from tasks.common import Task

PHRASINGS = ("Write the letter {l} as many times as you can.", "Reply with nothing but the letter {l}.",
             "Say {l}, over and over.", "Give me a long row of {l}s.")


class ToyLetters(Task):
    def __init__(self, letter="e", num_examples=256, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(letter, str) and len(letter) == 1 and letter.isalpha()):
            raise ValueError(f"letter must be a single letter, got {letter!r}")
        self.letter, self.n = letter.lower(), num_examples

    def num_examples(self):
        return self.n

    def get_example(self, index):
        prompt = PHRASINGS[index % len(PHRASINGS)].format(l=self.letter)
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": " ".join([self.letter * 4] * 4)}]}

    def reward(self, conversation, completion):
        letters = [c for c in completion.lower() if c.isalpha()]
        return sum(c == self.letter for c in letters) / len(letters) if letters else 0.0

    def evaluate(self, conversation, completion):
        return int(self.reward(conversation, completion) >= 0.4)
