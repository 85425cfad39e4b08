"""
Conversation quality (nanochat/chat_quality.py, scripts/chat_quality.py). Stand-in models with known
probabilities or scripted replies make every figure known in advance: a context-free model whose probability
of a token is 2^-9 per byte gives an exact bpb under two very different tokenizers; models that loop, end
properly, stop at <|bos|> or write French give the reply statistics their extremes. The tiny checkpoint,
trained briefly on the in-repo conversations, must beat itself untrained and before that training.
"""
import copy
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import FIXTURE_CHAT, REPO_ROOT, require_shared_data
from nanochat import chat_quality as cq
from nanochat.engine import Engine
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

QUESTIONS, TASKS = os.path.join(FIXTURE_CHAT, "questions.jsonl"), os.path.join(FIXTURE_CHAT, "tasks.jsonl")


pytestmark = pytest.mark.usefixtures("one_thread")


def fixture_conversations():
    return cq.load_conversations(QUESTIONS)[0] + cq.load_conversations(TASKS)[0]


def byte_tokenizer():
    """No merges: every byte is its own token, then our special tokens."""
    return Tokenizer({bytes([i]): i for i in range(256)}, {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})


class FakeLM(nn.Module):
    """The model interface the evaluation and the engine use; the logits at a position are
    logits_of(last token ids (B, T)) -> (B, T, V): a context-free model."""

    def __init__(self, vocab_size, logits_of, sequence_len=4096):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, sequence_len=sequence_len, n_layer=1, n_kv_head=1,
                                      head_dim=2)
        self.logits_of = logits_of
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def get_device(self):
        return self.anchor.device

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        logits = self.logits_of(idx[:, -1:] if last_only else idx)
        if targets is None:
            return logits
        assert loss_reduction == "none"
        return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1,
                               reduction="none").view(targets.shape)


def byte_cost_model(tokenizer, sequence_len=4096):
    """p(token) = 2^-(9 x its bytes) for text tokens, 1/4 for <|assistant_end|>, 1/16 for <|python_start|> and
    <|python_end|>, the rest of the mass on <|bos|>, whatever came before."""
    V, s = tokenizer.get_vocab_size(), tokenizer.encode_special
    p = torch.zeros(V, dtype=torch.float64)
    nbytes = tokenizer.token_bytes().double()
    p[nbytes > 0] = 2.0 ** (-9 * nbytes[nbytes > 0])
    p[s("<|assistant_end|>")], p[s("<|python_start|>")], p[s("<|python_end|>")] = 1 / 4, 1 / 16, 1 / 16
    p[s("<|bos|>")] = 1 - p.sum()
    assert p[s("<|bos|>")] > 0
    logp = p.log().float()
    return FakeLM(V, lambda idx: logp.expand(*idx.shape, V).clone(), sequence_len)


def next_token_model(tokenizer, chain, default):
    """A model that puts (almost) all its mass on next[last token]: chain maps token -> next token."""
    V = tokenizer.get_vocab_size()
    table = torch.full((V,), default, dtype=torch.long)
    for a, b in chain.items():
        table[a] = b
    return FakeLM(V, lambda idx: F.one_hot(table[idx], V).float() * 60.0)


def expected_bits(conversations):
    """What byte_cost_model must give: 9 bits per assistant byte, 2 bits per <|assistant_end|>, 4 bits per
    <|python_start|> or <|python_end|>; and the bytes."""
    bits = nbytes = 0
    for c in conversations:
        for m in c["messages"]:
            if m["role"] != "assistant":
                continue
            parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            for part in parts:
                if part["type"] != "python_output":
                    nbytes += len(part["text"].encode("utf-8"))
                    bits += 9 * len(part["text"].encode("utf-8")) + (8 if part["type"] == "python" else 0)
            bits += 2
    return bits, nbytes

# -----------------------------------------------------------------------------
# bits per byte


def test_bpb_is_exact_and_the_same_for_two_tokenizers(tokenizer):
    convs = fixture_conversations()
    convs.append({"messages": [{"role": "user", "content": "Dis bonjour."},
                               {"role": "assistant", "content": "Bonjour, ça va très bien. 你好!"}]})
    bits, nbytes = expected_bits(convs)
    small = byte_tokenizer()
    phrase = "The weather is lovely today"
    assert len(small.encode(phrase)) > 3 * len(tokenizer.encode(phrase))  # many more, shorter tokens
    results = []
    for tok in (tokenizer, small):
        for T in (4096, 16):  # whole conversations, and windows of 16 targets
            out = cq.assistant_bpb(byte_cost_model(tok, T), tok, convs, batch_size=5)
            assert out["bytes"] == nbytes and out["conversations"] == len(convs)
            results.append(out["bpb"])
    assert results == pytest.approx([bits / nbytes] * 4, rel=1e-6)
    # the figure is bits per byte, not per token: the two tokenizers' token counts differ a lot
    assert cq.assistant_bpb(byte_cost_model(small), small, convs)["tokens"] > 2 * \
        cq.assistant_bpb(byte_cost_model(tokenizer), tokenizer, convs)["tokens"]


def test_bpb_by_source_and_context_use_of_a_context_free_model(tokenizer):
    convs = fixture_conversations()
    sources = ["questions"] * 24 + ["tasks"] * 20
    out = cq.assistant_bpb(byte_cost_model(tokenizer), tokenizer, convs, sources)
    for name, part in (("questions", convs[:24]), ("tasks", convs[24:])):
        bits, nbytes = expected_bits(part)
        assert out["by_source"][name]["bpb"] == pytest.approx(bits / nbytes, rel=1e-6)
        assert out["by_source"][name]["conversations"] == len(part)
    ctx = cq.context_use(byte_cost_model(tokenizer), tokenizer, convs)
    multi = [c for c in convs if sum(m["role"] == "user" for m in c["messages"]) >= 2]
    assert ctx["conversations"] == len(multi) == 5
    assert ctx["gain"] == pytest.approx(0.0, abs=1e-9)  # it ignores the context, so earlier turns are worth nothing
    final = [{"messages": c["messages"][-1:]} for c in multi]
    bits, nbytes = expected_bits(final)
    assert ctx["bytes"] == nbytes and ctx["bpb_full"] == pytest.approx(bits / nbytes, rel=1e-6)


def test_final_turn_rows_keep_the_system_message_and_mask_only_the_final_turn(tokenizer):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."},
                         {"role": "assistant", "content": "Goodbye."}, {"role": "user", "content": "(left)"}]}
    (whole, wmask), (last, lmask) = cq.final_turn_rows(tokenizer, conv, 4096)
    text = tokenizer.decode(last)
    assert "Be brief." in text and "Bye." in text and "Hello." not in text and "(left)" not in text
    assert "Hello." in tokenizer.decode(whole)
    for ids, mask in ((whole, wmask), (last, lmask)):
        assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Goodbye.<|assistant_end|>"
    (whole, _), (last, _) = cq.final_turn_rows(tokenizer, conv, 8)  # the last T + 1 tokens
    assert len(whole) == len(last) == 9 and whole == last
    assert cq.final_turn_rows(tokenizer, {"messages": conv["messages"][1:3]}, 64) is None  # one user turn


def test_a_model_trained_on_conversations_beats_untrained_and_base(tiny_checkpoint, tokenizer):
    from nanochat.chat_data import pad_conversations
    from nanochat.checkpoint import load_model
    from nanochat.gpt import GPT
    base, _, _ = load_model("base", "cpu", model_tag="tiny")
    convs = fixture_conversations()
    heldout = convs[18:24] + convs[38:]  # 6 questions, 6 tasks never trained on
    train = convs[:18] + convs[24:38]
    untrained = GPT(base.config)
    untrained.init_weights()
    chat = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(chat.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    T = base.config.sequence_len
    for _ in range(20):  # (more overfits these 32 conversations: held-out bpb rises again)
        batch = [train[i] for i in torch.randperm(len(train), generator=g)[:8].tolist()]
        x, y = pad_conversations([tokenizer.render_conversation(c, max_tokens=T + 1) for c in batch], 0)
        loss = chat(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    bpb = {name: cq.assistant_bpb(m.eval(), tokenizer, heldout)["bpb"]
           for name, m in (("untrained", untrained), ("base", base), ("chat", chat))}
    # uniform logits at initialization: log2(vocab) bits per token
    tokens = cq.assistant_bpb(untrained, tokenizer, heldout)
    assert bpb["untrained"] == pytest.approx(math.log2(tokenizer.get_vocab_size()) * tokens["tokens"]
                                             / tokens["bytes"], rel=1e-4)
    assert bpb["chat"] < bpb["base"] - 0.2 and bpb["base"] < bpb["untrained"] - 0.2, bpb

# -----------------------------------------------------------------------------
# replies


def replies_of(model, tokenizer, convs, max_new_tokens=24):
    return cq.evaluate_replies(Engine(model, tokenizer), tokenizer, convs, max_new_tokens=max_new_tokens)


def test_a_model_that_repeats_itself_and_never_ends(tokenizer):
    the = tokenizer.encode(" the")
    assert len(the) == 1
    model = next_token_model(tokenizer, {}, the[0])
    out = replies_of(model, tokenizer, fixture_conversations()[:6])
    for setting in ("serving", "greedy"):
        s = out[setting]
        assert s["replies"] == 6 and s["ended"] == 0.0 and s["leak"] == 0.0
        assert s["words"] == 24 and s["repeat4"] == pytest.approx(1 - 1 / 21)
        assert s["distinct1"] == pytest.approx(1 / (6 * 24)) and s["distinct2"] == pytest.approx(1 / (6 * 23))
    ref = out["reference"]  # the held-out replies themselves: varied, no loops
    assert ref["repeat4"] < 0.05 and ref["distinct1"] > 0.5 and ref["ended"] is None and ref["english"] == 1.0


def test_a_model_that_ends_properly_and_ones_that_leak(tokenizer):
    s = tokenizer.encode_special
    sentence = tokenizer.encode("Hello there, how are you today?")
    assert len(set(sentence)) == len(sentence)
    chain = {s("<|assistant_start|>"): sentence[0], sentence[-1]: s("<|assistant_end|>")}
    chain |= dict(zip(sentence, sentence[1:]))
    convs = fixture_conversations()[:5]
    out = replies_of(next_token_model(tokenizer, chain, sentence[0]), tokenizer, convs)
    for setting in ("serving", "greedy"):
        st = out[setting]
        assert st["ended"] == 1.0 and st["leak"] == 0.0 and st["repeat4"] == 0.0 and st["english"] == 1.0
        assert st["words"] == 6 and st["distinct1"] == pytest.approx(6 / 30)
    assert out["samples"][0]["serving"] == "Hello there, how are you today?"
    # stops at <|bos|> after a word: not a proper end, and a leak
    hi = tokenizer.encode("Hi")[0]
    out = replies_of(next_token_model(tokenizer, {s("<|assistant_start|>"): hi, hi: s("<|bos|>")}, hi), tokenizer, convs)
    assert out["greedy"]["ended"] == 0.0 and out["greedy"]["leak"] == 1.0 and out["greedy"]["words"] == 1
    # opens a user turn inside its reply, then ends: ended, but leaked
    chain = {s("<|assistant_start|>"): hi, hi: s("<|user_start|>"), s("<|user_start|>"): s("<|assistant_end|>")}
    out = replies_of(next_token_model(tokenizer, chain, hi), tokenizer, convs)
    assert out["serving"]["ended"] == 1.0 and out["serving"]["leak"] == 1.0


def test_text_statistics():
    assert cq.words("Don't stop, it's 10 o'clock!") == ["don't", "stop", "it's", "10", "o'clock"]
    assert cq.repeated_share("a b c d a b c d".split()) == pytest.approx(1 - 4 / 5)
    assert cq.repeated_share("a b c".split()) is None
    assert cq.distinct_n([["a", "b"], ["a", "c"]], 1) == pytest.approx(3 / 4)
    assert cq.distinct_n([["a", "b"], ["a", "b"]], 2) == pytest.approx(1 / 2)
    assert cq.is_english("I think it is going to rain this afternoon, so take an umbrella.")
    assert cq.is_english("Paris.")  # too short for the function-word test
    assert not cq.is_english("Je pense qu'il va pleuvoir cet après-midi, prends un parapluie.")
    assert not cq.is_english("我认为今天下午会下雨。")
    assert not cq.is_english("") and not cq.is_english("12345 !!")
    stats = cq.reply_stats([{"text": "one two three four five six seven eight nine ten"}, {"text": "one"}])
    assert stats["words"] == 5.5 and stats["words_p10"] == pytest.approx(1.9) and stats["words_p90"] == pytest.approx(9.1)
    assert stats["ended"] is None and stats["repeat4"] == 0.0


def test_decontaminate_and_load_conversations(tmp_path):
    convs = fixture_conversations()
    held = [convs[0], {"messages": [{"role": "user", "content": "  What is the CAPITAL of France?"},
                                    {"role": "assistant", "content": "Different answer."}]}, convs[30]]
    assert cq.decontaminate(held, convs[:24]) == [2]  # same user turns, whitespace and case aside
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"messages": convs[0]["messages"], "source": "geo"}) + "\n"
                    + json.dumps({"messages": convs[1]["messages"]}) + "\n")
    rows, sources = cq.load_conversations(str(path))
    assert len(rows) == 2 and sources == ["geo", "mine"]
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="mine.jsonl:1: message 0 has role 'assistant'"):
        cq.load_conversations(str(path))


def test_library_imports_nothing_from_tasks():
    import ast
    tree = ast.parse(open(cq.__file__).read())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m == "tasks" or m.startswith("tasks.")], imported

# -----------------------------------------------------------------------------
# the script


def test_script_on_the_tiny_checkpoint(tiny_checkpoint, capsys):
    from nanochat.report import read_section_metrics
    from scripts.chat_quality import main
    out = main(["-i", "base", "-g", "tiny", f"--data={TASKS}", "--max-replies=4", "--max-new-tokens=16"])
    printed = capsys.readouterr().out
    assert "assistant bpb" in printed and "| repeat4 | lower |" in printed and "wrote" in printed
    m = out["metrics"]
    assert 0 < m["assistant_bpb"] < 20 and set(out["bpb"]["by_source"]) == {"tasks"}
    assert out["context"]["conversations"] == 5 and "context_gain" in m
    assert out["replies"]["serving"]["replies"] == 4 and 0 <= m["reply_ended"] <= 1 and "greedy_repeat4" in m
    assert read_section_metrics("Chat quality base") == pytest.approx(m)
    again = main(["-i", "base", "-g", "tiny", f"--data={TASKS}", "--max-replies=4", "--max-new-tokens=16"])
    assert again["metrics"] == m  # deterministic given the seed


def test_script_errors_name_the_flag_and_file(tiny_checkpoint, tmp_path, capsys):
    from scripts.chat_quality import main
    with pytest.raises(SystemExit, match="--data: .*no-such.jsonl"):
        main(["-i", "base", f"--data={tmp_path / 'no-such.jsonl'}"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1: the conversation is empty"):
        main(["-i", "base", f"--data={bad}"])
    users = tmp_path / "users.jsonl"
    users.write_text('{"messages": [{"role": "user", "content": "Hello?"}]}\n')
    with pytest.raises(SystemExit, match="users.jsonl .*no assistant text"):
        main(["-i", "base", "-g", "tiny", f"--data={users}"])
    with pytest.raises(SystemExit) as e:
        main(["-i", "base", "--max-new-tokens=0"])
    assert e.value.code == 2 and "--max-new-tokens" in capsys.readouterr().err


def test_default_data_is_the_decontaminated_heldout_split():
    require_shared_data("chat")
    from scripts.chat_quality import heldout_from_mixture
    from tasks.mixtures import build_mixture
    convs, sources, note = heldout_from_mixture("english-chat")
    mix = build_mixture("english-chat", "sft")
    assert len(convs) == len(sources) == sum(map(len, mix.val)) and "english-chat" in note
    assert set(sources) == set(mix.names) and sources[:len(mix.names)] == mix.names  # sources interleaved
    trained = {cq.user_key(mix.get((s, i))) for s, rows in enumerate(mix.train) for i in rows}
    assert not any(cq.user_key(c) in trained for c in convs)


def test_two_gloo_ranks_match_one_process(tiny_checkpoint):
    from nanochat.report import get_report_dir, read_section_metrics
    from scripts.chat_quality import main
    flags = ["-i", "base", "-g", "tiny", f"--data={TASKS}", "--max-replies=5", "--max-new-tokens=12",
             "--batch-size=3", "--device-type=cpu"]
    single = main(flags)["metrics"]
    os.remove(os.path.join(get_report_dir(), "chat-quality-base.json"))  # rank 0 of the run below writes it again
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "scripts.chat_quality", *flags], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert read_section_metrics("Chat quality base") == pytest.approx(single, rel=1e-5)
