"""The terminal chat: -p answers once (and equals the engine's greedy reply), piped interactive sessions with
clear / quit, multi-turn token bookkeeping, Ctrl-C during a reply and at the prompt, and clear errors."""
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO_ROOT
from scripts.chat_cli import Chat, main


def run_cli(args, input=None, env=None, timeout=120):
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", *args], cwd=REPO_ROOT, input=input,
                          capture_output=True, text=True, timeout=timeout, env=env)


TINY = ["-i", "base", "--model-tag", "tiny", "--device-type", "cpu"]


def test_prompt_mode_prints_the_greedy_reply(tiny_checkpoint):
    from nanochat.checkpoint import load_model
    from nanochat.engine import Engine
    question = "The capital of France is"
    r = run_cli(TINY + ["-p", question, "--temperature", "0", "--max-tokens", "12"])
    assert r.returncode == 0, r.stderr
    model, tok, _ = load_model("base", "cpu", model_tag="tiny")
    prompt = tok.render_for_completion([{"role": "user", "content": question}])
    results, _ = Engine(model, tok).generate_batch(prompt, max_tokens=12, temperature=0.0)
    reply = tok.decode(results[0][len(prompt):])
    assert reply.strip() and r.stdout == reply + "\n"


def test_piped_interactive_session(tiny_checkpoint):
    r = run_cli(TINY + ["--max-tokens", "6"], input="Hello there\n\nclear\nWhat is up?\n/clear\nquit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant: ") == 2 and r.stdout.count("(conversation cleared)") == 2
    assert "never read" not in r.stdout and "Traceback" not in r.stderr
    eof = run_cli(TINY, input="")  # Ctrl-D at the prompt
    assert eof.returncode == 0 and "Traceback" not in eof.stderr


def test_missing_checkpoint_and_bad_flags(tmp_path):
    r = run_cli(["-i", "sft", "-p", "hi", "--device-type", "cpu"], env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path)))
    assert r.returncode == 1 and "no sft checkpoint" in r.stderr and "Traceback" not in r.stderr
    for argv, flag in ((["--temperature", "-1"], "--temperature"), (["--top-k", "-3"], "--top-k"),
                       (["--max-tokens", "0"], "--max-tokens"), (["-i", "nope"], "--source"), (["--bogus"], "--bogus"),
                       (["-p", "  "], "--prompt")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv


class FakeEngine:
    """Replies with `reply` token by token (then <|assistant_end|>); sends SIGINT after
    `interrupt_after` tokens. Records each prompt and whether the generator was closed."""

    def __init__(self, tok, reply, interrupt_after=None):
        self.tok, self.reply, self.interrupt_after = tok, reply, interrupt_after
        self.model = SimpleNamespace(config=SimpleNamespace(sequence_len=1000))
        self.end = tok.encode_special("<|assistant_end|>")
        self.stop_tokens = {self.end, tok.get_bos_token_id()}
        self.prompts, self.closed = [], 0

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        self.prompts.append(list(tokens))
        try:
            for n, t in enumerate(self.tok.encode(self.reply) + [self.end]):
                if n == self.interrupt_after:  # Ctrl-C, as the terminal delivers it (a handler-less thread: raise)
                    if threading.current_thread() is threading.main_thread():
                        signal.raise_signal(signal.SIGINT)
                    else:
                        raise KeyboardInterrupt
                yield [t], [1]
        finally:
            self.closed += 1


def test_multi_turn_tokens_clear_and_ctrl_c(tokenizer, capsys):
    tok = tokenizer
    s = tok.encode_special
    args = SimpleNamespace(max_tokens=50, temperature=0.6, top_k=50, seed=7)
    engine = FakeEngine(tok, "Fine, thanks! \u00e9t\u00e9")  # non-ASCII: streamed without broken characters
    chat = Chat(engine, tok, "cpu", args)
    assert chat.reply("How are you?") == "Fine, thanks! \u00e9t\u00e9"
    chat.reply("And now?")
    turn1 = tok.render_conversation([{"role": "user", "content": "How are you?"},
                                     {"role": "assistant", "content": "Fine, thanks! \u00e9t\u00e9"}])[0]
    assert engine.prompts[0] == tok.render_for_completion([{"role": "user", "content": "How are you?"}])
    assert engine.prompts[1] == turn1 + [s("<|user_start|>"), *tok.encode("And now?"), s("<|user_end|>"),
                                         s("<|assistant_start|>")]
    chat.clear()
    chat.reply("Hi")
    assert engine.prompts[2] == tok.render_for_completion([{"role": "user", "content": "Hi"}])
    assert engine.closed == 3
    out = capsys.readouterr().out
    assert out.count("Fine, thanks! \u00e9t\u00e9\n") == 3

    engine.interrupt_after = 3  # Ctrl-C during the reply: partial reply kept, session goes on
    # Python's own Ctrl-C handler, as in a terminal (a test run launched in the background inherits SIGINT ignored)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if in_main else None
    try:
        partial = chat.reply("Tell me more")
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    assert partial == tok.decode(tok.encode(engine.reply)[:3]) and "[stopped]" in capsys.readouterr().out
    assert chat.tokens[-4:] == tok.encode(engine.reply)[:3] + [s("<|assistant_end|>")]
    assert engine.closed == 4
    engine.interrupt_after = None
    assert chat.reply("ok") == engine.reply


def never_ending_checkpoint(tokenizer, base):
    """A random sft model that, greedily, never produces <|assistant_end|>, <|bos|> or <|python_start|>."""
    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 1.0)
        for name in ("<|assistant_end|>", "<|bos|>", "<|python_start|>"):
            model.lm_head.weight[tokenizer.encode_special(name)] = 0.0  # logit 0 < the largest of 4096 random ones
    tokenizer.save(str(base / "tokenizer"))
    save_checkpoint(str(base / "sft_checkpoints" / "d1"), 1, model.state_dict(), None, {"model_config": asdict(config)})


class Reader:
    """Collects a pipe's output in a thread so the test can wait for text to appear."""

    def __init__(self, stream):
        self.text, self.stream = "", stream
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while chunk := os.read(self.stream.fileno(), 4096):
            self.text += chunk.decode("utf-8", errors="replace")

    def wait_for(self, predicate, what, timeout=60):
        deadline = time.time() + timeout
        while not predicate(self.text):
            assert time.time() < deadline, f"timed out waiting for {what}; output so far:\n{self.text[-2000:]}"
            time.sleep(0.02)


def test_ctrl_c_stops_a_reply_but_not_the_session(tokenizer, tmp_path):
    never_ending_checkpoint(tokenizer, tmp_path)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", "-i", "sft", "--device-type", "cpu",
                             "--temperature", "0", "--max-tokens", "1000000"], cwd=REPO_ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # SIGINT as a terminal's foreground job has it: a CI launched in the background passes
                            # it on ignored, and an ignored Ctrl-C (rightly) stops nothing
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = Reader(proc.stdout)
    try:
        out.wait_for(lambda t: "User: " in t, "the first prompt")
        proc.stdin.write(b"Tell me a long story\n")
        proc.stdin.flush()
        out.wait_for(lambda t: len(t.partition("Assistant: ")[2]) > 200, "the reply to stream")
        proc.send_signal(signal.SIGINT)
        out.wait_for(lambda t: "[stopped]" in t and "User: " in t.partition("[stopped]")[2], "the next prompt")
        assert proc.poll() is None, "Ctrl-C during a reply must not end the session"
        proc.stdin.write(b"clear\n")
        proc.stdin.flush()
        out.wait_for(lambda t: "User: " in t.partition("(conversation cleared)")[2], "the prompt after clear")
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt leaves cleanly
        assert proc.wait(timeout=30) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
