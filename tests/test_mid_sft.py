"""Chat stages on CPU: mixtures (held-out slices, no evaluation leaks, english-chat content), rendering masks
on the shared chat data, packing and loader state on the in-repo conversations, and the tiny base model through midtraining and SFT (held-out loss
falls at each stage, exact resume, clear errors)."""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURE_CHAT, REPO_ROOT, TEST_VOCAB_SIZE, require_shared_data
from nanochat import checkpoint as ck
from nanochat.chat_data import ConversationStream, PackedLoader, PaddedLoader, pad_conversations


@contextlib.contextmanager
def single_thread():
    """Tiny models are fastest on one thread, and on a shared machine two OpenMP threads that get
    descheduled spin at every barrier (measured 30x slower steps here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


pytestmark = pytest.mark.usefixtures("one_thread")


def chat_file(name):
    return require_shared_data("chat", f"{name}.jsonl.gz")


def small_mixture(*names, weight=1.0):
    """A mixture of the in-repo conversation files (tests/fixtures/chat/NAME.jsonl: questions, tasks)."""
    from tasks.chat import ChatTask
    from tasks.mixtures import Mixture
    return Mixture([(n, ChatTask(os.path.join(FIXTURE_CHAT, f"{n}.jsonl")), weight) for n in names], decontaminate=False)


def _log(ckpt_dir):
    with open(os.path.join(ckpt_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]

# -----------------------------------------------------------------------------
# rendering, packing, padding


def test_render_masks_on_shared_chat_and_tool_calls(tokenizer):
    from tasks.chat import ChatTask
    from tasks.gsm8k import GSM8K
    s = tokenizer.encode_special
    convs = list(ChatTask(chat_file("sgd_dialogues"), stop=20)) + [GSM8K(split="train", path=require_shared_data(
        "eval", "gsm8k", "train.jsonl"))[0]]
    for conv in convs:
        ids, mask = tokenizer.render_conversation(conv, max_tokens=100_000)
        assert ids[0] == tokenizer.get_bos_token_id() and len(ids) == len(mask)
        state = None  # who wrote the current token
        for i, m in zip(ids, mask):
            if i == s("<|user_start|>"):
                state = "user"
            elif i == s("<|assistant_start|>"):
                state, expected = "assistant", 0  # the prompt for the reply, not the reply
                assert m == expected
                continue
            elif i == s("<|output_start|>"):
                state = "output"
            expected = 1 if state == "assistant" else 0  # tool calls and <|assistant_end|> included
            assert m == expected, (tokenizer.id_to_token(i), state)
            if i in (s("<|user_end|>"), s("<|assistant_end|>")):
                state = None
            elif i == s("<|output_end|>"):
                state = "assistant"
    # the GSM8K conversation has a tool call and its output
    ids, mask = tokenizer.render_conversation(convs[-1], max_tokens=100_000)
    assert s("<|python_start|>") in ids and s("<|output_start|>") in ids


def test_packed_rows_are_the_conversations_end_to_end(tokenizer):
    mixture = small_mixture("questions", "tasks")
    B, T = 3, 64
    loader = PackedLoader(tokenizer, ConversationStream(mixture, seed=1), B, T)
    batches = [next(loader) for _ in range(6)]
    # the same stream rendered by hand
    stream, expected, masks = ConversationStream(mixture, seed=1), [], []
    while len(expected) < 6 * B * T + 1:
        ids, mask = tokenizer.render_conversation(next(stream), max_tokens=1 << 20)
        expected += ids
        masks += mask
    got = torch.cat([x.reshape(-1) for x, _ in batches]).tolist()
    assert got == expected[:6 * B * T]  # full rows, no padding, conversations in stream order
    targets = torch.cat([y.reshape(-1) for _, y in batches]).tolist()
    assert targets == expected[1:6 * B * T + 1]  # every token is a target exactly once
    assert expected.count(tokenizer.get_bos_token_id()) > 4  # several conversations, each opened by BOS
    # masked packing: -1 exactly where the target token is not the assistant's
    loader = PackedLoader(tokenizer, ConversationStream(mixture, seed=1), B, T, mask_loss=True)
    masked = torch.cat([next(loader)[1].reshape(-1) for _ in range(6)]).tolist()
    want = [t if m else -1 for t, m in zip(expected[1:6 * B * T + 1], masks[1:6 * B * T + 1])]
    assert masked == want and 0 < sum(t != -1 for t in masked) < len(masked)


def test_padded_rows_learn_only_assistant_tokens(tokenizer):
    from tasks.mixtures import build_mixture
    require_shared_data("eval", "gsm8k")
    mixture = build_mixture("reference", "sft")
    stream = ConversationStream(mixture, seed=3)
    loader = PaddedLoader(tokenizer, ConversationStream(mixture, seed=3), B=8, T=256)
    x, y = next(loader)
    convs = [next(stream) for _ in range(8)]
    assert x.shape[0] == 8 and x.shape[1] <= 256
    for b, conv in enumerate(convs):
        ids, mask = tokenizer.render_conversation(conv, max_tokens=257)
        n = len(ids) - 1
        assert x[b, :n].tolist() == ids[:-1]
        assert y[b, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert (y[b, n:] == -1).all()  # padding is never a target
    # pad_conversations truncates to max_len
    xs, ys = pad_conversations([([1, 2, 3, 4, 5], [0, 1, 1, 0, 1])], pad_id=0, max_len=3)
    assert xs.tolist() == [[1, 2, 3]] and ys.tolist() == [[2, 3, -1]]


def test_step_loss_weighs_every_token_the_same(tiny_checkpoint, tokenizer):
    """Micro-batches with different numbers of target tokens: the accumulated gradient equals the gradient of
    the mean loss over all their tokens at once (not the mean of per-batch means)."""
    from contextlib import nullcontext
    from nanochat.training import accumulate_gradients
    model, _ = ck.build_model(tiny_checkpoint[0], 40, "cpu", phase="train")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4000, (4, 20), generator=g)
    y = torch.randint(0, 4000, (4, 20), generator=g)
    y[0, 3:] = -1  # row 0 has 3 targets, the others 20
    y[1, 10:] = -1
    loss = accumulate_gradients(model, [(x[:2], y[:2]), (x[2:], y[2:])], nullcontext)
    split = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    whole = model(x, y)  # mean over every target token
    whole.backward()
    assert loss == pytest.approx(whole.item(), rel=1e-5)
    for a, p in zip(split, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["packed", "padded"])
def test_loader_state_resumes_exactly(tokenizer, kind):
    mixture = small_mixture("questions", "tasks", weight=0.5)

    def make():
        stream = ConversationStream(mixture, slot=1, num_slots=2, seed=7)
        return PackedLoader(tokenizer, stream, 2, 48) if kind == "packed" else PaddedLoader(tokenizer, stream, 2, 48)
    a = make()
    for _ in range(40):  # past an epoch boundary: 22 rows per epoch, 11 per slot
        next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(70)]
    b = make()
    b.load_state_dict(state)
    got = [next(b) for _ in range(70)]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(want, got))
    other = ConversationStream(mixture, slot=0, num_slots=2, seed=7)
    with pytest.raises(ValueError, match="slot"):
        other.load_state_dict(state["stream"])


def test_slots_split_each_epoch_and_fractional_weights_resample(tokenizer):
    mixture = small_mixture("tasks", weight=2.5)
    n = len(mixture.train[0])
    assert len(mixture) == round(2.5 * n)
    rows0, rows1 = mixture.epoch_rows(0, seed=5), mixture.epoch_rows(1, seed=5)
    assert rows0 == mixture.epoch_rows(0, seed=5) and rows0 != rows1
    counts = {i: 0 for i in mixture.train[0]}
    for _, i in rows0:
        counts[i] += 1
    assert set(counts.values()) <= {2, 3} and sum(counts.values()) == len(mixture)
    slots = [ConversationStream(mixture, s, 3, seed=5) for s in range(3)]
    taken = sorted(r for s in slots for r in s.rows(0))
    assert taken == sorted(rows0)

# -----------------------------------------------------------------------------
# mixtures


def test_holdout_is_fixed_and_disjoint():
    from tasks.mixtures import build_mixture, holdout_split
    require_shared_data("eval", "gsm8k")
    mid, sft = build_mixture("reference", "mid"), build_mixture("reference", "sft")
    assert mid.val_rows() == sft.val_rows() and len(mid.val_rows()) > 100
    for s in range(len(mid.names)):
        assert not set(mid.train[s]) & set(mid.val[s]) and mid.val[s]
    # every source's slice shows up in a short prefix of the interleaved list
    assert {s for s, _ in mid.val_rows(len(mid.names))} == set(range(len(mid.names)))
    assert holdout_split(1000) == holdout_split(1000) and len(holdout_split(1000)[1]) == 20
    assert holdout_split(1) == ([0], [])


def _user_keys(task):
    from tasks.mixtures import first_user_text, question_key
    return {question_key(first_user_text(c)) for c in task}


def test_english_chat_has_no_math_code_or_multiple_choice():
    from tasks.arc import ARC
    from tasks.chat import ChatTask
    from tasks.gsm8k import GSM8K
    from tasks.mixtures import build_mixture, first_user_text, looks_like_code, question_key
    from tasks.mmlu import MMLU
    require_shared_data("eval", "mmlu")
    banned = set()
    for task in (GSM8K(split="train"), GSM8K(split="test"), MMLU(split="dev"), MMLU(split="test"), ARC("ARC-Easy"),
                 ARC("ARC-Challenge"), ChatTask("gpteacher_codegen"), ChatTask("gpteacher_toolformer")):
        banned |= _user_keys(task)
    for stage in ("mid", "sft"):
        mix = build_mixture("english-chat", stage)
        assert not {"gsm8k-train", "mmlu-dev", "gpteacher_codegen", "gpteacher_toolformer"} & set(mix.names)
        assert "identity" in mix.names
        refs = [r for r in mix.epoch_rows(0)] + mix.val_rows()
        for ref in refs:
            conv = mix.get(ref)
            assert question_key(first_user_text(conv)) not in banned, conv
            assert "letters" not in conv and not looks_like_code(conv)
            assert all(isinstance(m["content"], str) for m in conv["messages"]), "no tool-call parts"
            assert "```" not in json.dumps(conv)
    # the reference mixture, by contrast, does teach those
    ref = build_mixture("reference", "mid")
    assert {"gsm8k-train", "mmlu-dev", "gpteacher_codegen", "identity"} <= set(ref.names)


def test_no_evaluation_problem_is_trained_on():
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.mixtures import build_mixture, first_user_text, question_key
    from tasks.mmlu import MMLU
    require_shared_data("eval", "mmlu")
    evals = set()
    for task in (ARC("ARC-Easy"), ARC("ARC-Challenge"), MMLU(split="test"), GSM8K(split="test")):
        evals |= _user_keys(task)
    for stage in ("mid", "sft"):
        mix = build_mixture("reference", stage)
        trained = {question_key(first_user_text(mix.get((s, i)))) for s in range(len(mix.names)) for i in mix.train[s]}
        assert not trained & evals
        assert sum(mix.dropped) >= 5  # the MMLU dev questions that reappear in MMLU test


def test_extra_data_and_help(tmp_path, capsys):
    from tasks.mixtures import build_mixture, parse_extra_data
    path = tmp_path / "mine.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(50)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert parse_extra_data(f"{path}:3,{path}") == [(str(path), 3.0), (str(path), 1.0)]
    with pytest.raises(ValueError, match="weight"):
        parse_extra_data(f"{path}:lots")
    with pytest.raises(ValueError, match="positive"):
        parse_extra_data(f"{path}:0")
    require_shared_data("chat")
    mix = build_mixture("english-chat", "sft", extra_data=f"{path}:3")
    s = mix.names.index(str(path))
    assert len(mix.train[s]) == 49 and mix.rows_per_epoch(s) == 147 and len(mix.val[s]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        build_mixture("english-chat", "mid", extra_data=str(bad))
    from scripts import chat_sft, mid_train
    for module in (mid_train, chat_sft):
        with pytest.raises(SystemExit):
            module.get_args(["--help"])
        out = capsys.readouterr().out
        assert "english-chat" in out and "reference" in out and "gpteacher_toolformer" in out
        with pytest.raises(SystemExit):
            module.get_args(["--mixture=everything"])
        assert "--mixture" in capsys.readouterr().err

# -----------------------------------------------------------------------------
# the stages end to end on the tiny base model


MID_FLAGS = ["--model-tag=tiny", "--device-batch-size=4", "--total-batch-size=512", "--eval-conversations=48",
             "--eval-max-problems=16"]
SFT_FLAGS = ["--model-tag=tiny", "--device-batch-size=4", "--examples-per-step=8", "--eval-conversations=48",
             "--eval-max-problems=16", "--init-lr-frac=0.5"]


@pytest.fixture(scope="session")
def mid_run(tiny_checkpoint):
    """The tiny base model midtrained for 40 steps on the reference mixture (mid checkpoint tag 'tiny')."""
    from scripts import mid_train
    require_shared_data("eval", "mmlu")
    with single_thread():
        return mid_train.main(MID_FLAGS + ["--num-iterations=40", "--eval-every=20"])


@pytest.fixture(scope="session")
def sft_run(mid_run):
    """mid_run finetuned for 30 steps (sft checkpoint tag 'tiny')."""
    from scripts import chat_sft
    with single_thread():
        return chat_sft.main(SFT_FLAGS + ["--num-iterations=30", "--eval-every=15", "--eval-metrics-every=15"])


def test_mid_then_sft_lower_held_out_loss(mid_run, sft_run):
    from nanochat.report import read_section_metrics
    assert mid_run["val_loss"] < mid_run["first_val_loss"] - 0.5, mid_run
    # SFT starts on the same held-out conversations where midtraining ended...
    assert sft_run["first_val_loss"] == pytest.approx(mid_run["val_loss"], rel=1e-6)
    # ...and lowers the loss again
    assert sft_run["val_loss"] < sft_run["first_val_loss"] - 0.2, sft_run
    mid_log, sft_log = _log(mid_run["ckpt_dir"]), _log(sft_run["ckpt_dir"])
    assert [r["step"] for r in mid_log if "val_loss" in r] == [0, 20, 40]
    assert [r["step"] for r in mid_log if "loss" in r] == list(range(1, 41))
    assert [r["step"] for r in sft_log if "MMLU" in r] == [15, 30]
    assert ck.find_last_step(mid_run["ckpt_dir"]) == 40 and ck.find_last_step(sft_run["ckpt_dir"]) == 30
    meta = ck.read_meta(ck.step_dir(sft_run["ckpt_dir"], 30))
    assert meta["input"] == {"source": "mid", "model_tag": "tiny", "step": 40} and meta["mixture"] == "reference"
    mid_metrics, sft_metrics = read_section_metrics("Midtraining"), read_section_metrics("Chat SFT")
    assert mid_metrics["val_loss"] == pytest.approx(mid_run["val_loss"]) and "MMLU" in mid_metrics
    assert sft_metrics["val_loss"] == pytest.approx(sft_run["val_loss"]) and "ChatCORE" in sft_metrics
    # the sft checkpoint is what chat_eval / chat_web load
    model, tok, _ = ck.load_model("sft", "cpu", model_tag="tiny")
    assert model.config.n_layer == 2 and tok.get_vocab_size() == TEST_VOCAB_SIZE


def _weights_equal(dir_a, dir_b, step):
    a, _, _ = ck.load_checkpoint(dir_a, step, "cpu")
    b, _, _ = ck.load_checkpoint(dir_b, step, "cpu")
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_resume_matches_uninterrupted_run(mid_run, stage):
    from scripts import chat_sft, mid_train
    if stage == "mid":
        main, flags = mid_train.main, MID_FLAGS + ["--mixture=english-chat", "--mask-loss=true"]
    else:
        main, flags = chat_sft.main, SFT_FLAGS + ["--mixture=english-chat"]
    flags = flags + ["--num-iterations=6", "--save-every=3", "--eval-every=-1", "--eval-tasks=none"]
    main(flags + [f"--output-tag={stage}-straight"])
    main(flags + [f"--output-tag={stage}-resumed"])
    root = ck.checkpoints_root(stage)
    straight, resumed = os.path.join(root, f"{stage}-straight"), os.path.join(root, f"{stage}-resumed")
    shutil.rmtree(ck.step_dir(resumed, 6))  # as if the run had died after its step-3 checkpoint
    main(flags + [f"--output-tag={stage}-resumed", "--resume=true"])
    la = {r["step"]: r["loss"] for r in _log(straight) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in _log(resumed) if "loss" in r}
    assert sorted(lb) == list(range(1, 7)) and [la[s] for s in range(4, 7)] == [lb[s] for s in range(4, 7)]
    assert _weights_equal(straight, resumed, 6)


def test_missing_input_and_tokenizer_mismatch_are_clear(tokenizer, tiny_checkpoint, tmp_path, monkeypatch):
    from nanochat.tokenizer import Tokenizer
    from scripts import chat_sft, mid_train
    with pytest.raises(SystemExit, match="no complete checkpoint in .*base_checkpoints/nope"):
        mid_train.main(MID_FLAGS[1:] + ["--model-tag=nope", "--num-iterations=1"])
    with pytest.raises(SystemExit, match="cannot resume: no complete checkpoint"):
        chat_sft.main(SFT_FLAGS + ["--output-tag=never", "--resume=true"])
    # an empty base dir: no base model at all
    empty = tmp_path / "empty"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(empty))
    with pytest.raises(SystemExit, match=r"no base checkpoint .* train one first with `python -m scripts.base_train`"):
        mid_train.main(["--num-iterations=1"])
    with pytest.raises(SystemExit, match=r"no mid checkpoint .*scripts.mid_train"):
        chat_sft.main(["--num-iterations=1"])
    # the tiny base checkpoint next to a tokenizer with another vocabulary (the first 500 merges of ours)
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint[0], other / "base_checkpoints" / "tiny")
    ranks = {b: r for b, r in tokenizer.mergeable_ranks.items() if r < 500}
    Tokenizer(ranks, {name: 500 + k for k, name in enumerate(tokenizer.get_special_tokens())}).save(str(other / "tokenizer"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(other))
    with pytest.raises(SystemExit, match=f"tokenizer .* has 509 tokens but .* trained with {TEST_VOCAB_SIZE}"):
        mid_train.main(MID_FLAGS + ["--num-iterations=1"])


def test_sft_two_ranks_equal_one_rank_with_accumulation(mid_run):
    """Padded rows hold different numbers of target tokens; the loss is normalized over the whole step, so
    2 gloo ranks and 2 accumulation steps on 1 rank give the same model."""
    common = SFT_FLAGS + ["--mixture=english-chat", "--num-iterations=3", "--eval-every=-1", "--eval-tasks=none",
                          "--grad-clip=0.5"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, NANOCHAT_DTYPE="fp32", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "scripts.chat_sft", *common, "--output-tag=one"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "scripts.chat_sft", *common, "--device-batch-size=4", "--output-tag=two"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 rank(s) x 1 accumulation" in two.stdout and "1 rank(s) x 2 accumulation" in one.stdout
    root = ck.checkpoints_root("sft")
    a, _, _ = ck.load_checkpoint(os.path.join(root, "one"), 3, "cpu")
    b, _, _ = ck.load_checkpoint(os.path.join(root, "two"), 3, "cpu")
    start, _, _ = ck.load_checkpoint(mid_run["ckpt_dir"], 40, "cpu")
    for k in a:  # (exact here; Muon's bf16 orthogonalization may turn float-level differences into ~1% elsewhere)
        ua, ub = a[k] - start[k], b[k] - start[k]
        assert ua.norm() > 0 and (ua - ub).norm() <= 0.03 * ua.norm(), k
