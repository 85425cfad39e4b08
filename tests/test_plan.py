"""The budget planner: its figures are the model's own, its horizon is base_train's, its choice is
the largest depth that fits, and bad flags are errors that name the flag."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nanochat import recipe
from nanochat.gpt import GPT
from nanochat.recipe import config_from_flags
from scripts import ablate, base_train, plan

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100 = 989e12


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def args_for(*flags):
    return plan.get_args(list(flags) + ["--report=false"])


def model_counts(config):
    with torch.device("meta"):
        model = GPT(config)
    return model.num_params_by_group(), model.estimate_flops()


def test_model_flags_mirror_base_train():
    ours, theirs = plan.build_parser().parse_args([]), base_train.get_args([])
    for name in plan.MODEL_FLAGS + ("target_param_data_ratio", "total_batch_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    flags = ["--max-seq-len=512", "--mlp-ratio=2.5", "--activation=gelu", "--tie-embeddings=true", "--kv-head-ratio=2",
             "--softcap=0", "--rope-base=50000"]
    assert plan.make_config(args_for(*flags, "--vocab-size=512"), 8) == \
        config_from_flags(base_train.get_args(["--depth=8"] + flags), 512)


def model_flag_actions(module, monkeypatch):
    """{dest: the argparse action} of the architecture flags the script's get_args parser declares."""
    made, real = [], module.make_parser
    monkeypatch.setattr(module, "make_parser", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    module.get_args([])
    return {a.dest: a for a in made[0]._actions if a.dest in recipe.MODEL_FLAGS}


def test_scripts_accept_the_same_architecture_flags(monkeypatch):
    """base_train, plan and ablate take the architecture flags from nanochat.recipe.add_model_flags: the
    same names, types, choices and help; plan sweeps --depths instead of --depth, ablate's defaults are
    its tiny scale."""
    spec = lambda a: (a.option_strings, a.type, a.choices, a.help, type(a))
    flags = {m.__name__: model_flag_actions(m, monkeypatch) for m in (base_train, plan, ablate)}
    ours, theirs, tiny = flags["scripts.base_train"], flags["scripts.plan"], flags["scripts.ablate"]
    assert set(ours) == set(tiny) == set(recipe.MODEL_FLAGS) and set(theirs) == set(recipe.MODEL_FLAGS) - {"depth"}
    for dest, action in ours.items():
        assert spec(action) == spec(tiny[dest]) and (dest == "depth" or spec(action) == spec(theirs[dest])), dest
        assert tiny[dest].default == ablate.TINY_SCALE.get(dest, action.default), dest
        assert dest == "depth" or action.default == theirs[dest].default, dest


def test_plan_and_ablate_read_one_planned_changes_list(monkeypatch):
    """The planner's comparison and the ablation's variants are nanochat.recipe.PLANNED_CHANGES: a change
    added there shows up in both."""
    args = args_for()
    rows = plan.compare_changes(args, 20, H100, 4.8)
    changes = recipe.planned_changes(2048, context_label="seq")
    assert [label for label, _ in rows] == ["reference"] + [label for label, _ in changes]
    for (label, p), (_, change) in zip(rows[1:], changes):
        assert p.config == plan.make_config(args, 20, **change), label
    assert [label for label, _ in ablate.variants(256)] == ["reference"] + [label for label, _ in recipe.planned_changes(256)]
    extra = ("RoPE base 500000", dict(rope_base=500000.0), False)
    monkeypatch.setattr(recipe, "PLANNED_CHANGES", recipe.PLANNED_CHANGES + (extra,))
    assert dict(plan.compare_changes(args, 20, H100, 4.8))["RoPE base 500000"].config.rope_base == 500000.0
    assert dict(ablate.variants(256))["RoPE base 500000"] == ["--rope-base=500000"]


@pytest.mark.parametrize("depth,flags", [
    (4, []),
    (6, ["--tie-embeddings=true", "--max-seq-len=256"]),
    (8, ["--mlp-ratio=2.5", "--kv-head-ratio=2", "--activation=silu"]),
    (12, ["--mlp-ratio=3", "--n-kv-head=2", "--softcap=0", "--head-dim=64"]),
    (20, ["--tie-embeddings=true", "--max-seq-len=1024", "--mlp-ratio=3", "--kv-head-ratio=4"]),
])
def test_figures_are_the_models_own(depth, flags):
    args = args_for("--vocab-size=1000", *flags)
    p = plan.plan_config(args, plan.make_config(args, depth), H100, 4.8)
    params, flops = model_counts(plan.make_config(args, depth))
    assert p.params == params and p.flops_per_token == flops
    # and both agree with the closed form, so a silent change on either side shows up here
    c = p.config
    ve_layers = (c.n_layer + 1) // 2  # every other layer counting back from the last (--value-embeds is on by default)
    attn = c.n_layer * (2 * c.n_embd * c.n_embd + 2 * c.n_embd * c.n_kv_head * c.head_dim) + ve_layers * 32 * c.n_kv_head
    mlp = c.n_layer * 2 * c.n_embd * c.mlp_hidden_dim
    emb = c.vocab_size * c.n_embd
    ve = ve_layers * c.vocab_size * c.n_kv_head * c.head_dim
    head = 0 if c.tie_embeddings else emb
    assert params == dict(embedding=emb, head=head, attention=attn, mlp=mlp, value_embeds=ve, scalars=0,
                          total=emb + head + attn + mlp + ve, scaling=attn + mlp + emb)
    assert flops == 6 * (attn + mlp + emb) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
    # horizon exactly as base_train computes it: 10.5 tokens per scaling parameter, the batch from the power law
    # anchored at the depth-12 model of the same flags (2^19 tokens at its own budget)
    ref = model_counts(plan.make_config(args, 12))[0]["scaling"] * 10.5
    batch = 2 ** round(math.log2(2 ** 19 * (10.5 * params["scaling"] / ref) ** 0.383))
    assert p.batch == batch and p.steps == round(10.5 * params["scaling"] / batch) and p.tokens == p.steps * batch
    assert p.total_flops == flops * p.tokens


def test_hours_cost_and_data_formulas():
    assert plan.training_hours(8 * H100 * 0.4 * 3600 * 2.5, 8, H100, 0.4) == pytest.approx(2.5)
    args = args_for("--gpus=4", "--gpu=a100", "--mfu=0.5", "--gpu-hour-cost=2", "--vocab-size=1000")
    peak = plan.peak_flops_for(args)
    assert peak == 312e12
    p = plan.plan_config(args, plan.make_config(args, 6), peak, 5.0)
    assert p.hours == pytest.approx(p.total_flops / (4 * 312e12 * 0.5) / 3600)
    assert p.cost == pytest.approx(p.hours * 4 * 2)
    assert p.chars == p.tokens * 5.0
    assert plan.data_needed(1000, 2.5, 1000) == (2500, 3)
    assert plan.data_needed(1000, 2.0, 1000) == (2000, 2)
    assert plan.peak_flops_for(args_for("--peak-tflops=100")) == 100e12
    for gpu in plan.GPU_NAMES:  # every --gpu choice maps to a known peak
        assert plan.peak_flops_for(args_for(f"--gpu={gpu}")) > 0


def test_kv_cache_mha_vs_quarter_heads():
    mha = plan.plan_config(args_for(), plan.make_config(args_for(), 20), H100, 4.8)
    gqa_args = args_for("--kv-head-ratio=4")
    gqa = plan.plan_config(gqa_args, plan.make_config(gqa_args, 20), H100, 4.8)
    assert (mha.config.n_kv_head, gqa.config.n_kv_head) == (10, 2)
    assert mha.kv_bytes_per_token == 2 * 20 * 10 * 128 * 2 == 102400
    assert gqa.kv_bytes_per_token == 2 * 20 * 2 * 128 * 2 == 20480
    assert plan.kv_cache_bytes_per_token(20, 10, 128) * 1024 == 100 * 2**20
    text = plan.main(["--depths=20", "--kv-head-ratio=4", "--report=false"])["text"]
    assert "20.0 KiB" in text and "20.0 MiB" in text  # per token and per 1024-token sequence


def test_chosen_depth_is_the_largest_that_fits():
    # head dim 64 makes every depth a valid model, so the neighbour above always exists
    flags = ["--head-dim=64", "--depths=4:30", "--hours=1", "--reserve=0.2", "--gpus=8"]
    out = plan.main(flags + ["--report=false"])
    chosen, budget = out["chosen"], 1 * (1 - 0.2)
    assert chosen is not None and chosen.hours <= budget
    assert all(p.hours <= budget for p in out["plans"] if p.depth < chosen.depth)
    args = args_for(*flags)
    above = plan.plan_config(args, plan.make_config(args, chosen.depth + 1), H100, 4.8)
    assert above.hours > budget
    assert f"--depth={chosen.depth} " in out["text"]
    assert plan.choose_depth(out["plans"], 1e-9) is None
    # raise the budget by exactly the neighbour's hours: now it is chosen
    assert plan.choose_depth(out["plans"], above.hours).depth == chosen.depth + 1


def test_unused_budget_is_offered_as_a_higher_data_ratio():
    """A coarse depth grid leaves budget unused: the planner names the data ratio that spends it at the chosen depth
    (hours scale with tokens), rounded down so it still fits; with the budget spent it says nothing."""
    out = plan.main(["--depths=8,30", "--hours=5", "--report=false"])
    chosen, budget = out["chosen"], 5 * (1 - 0.15)
    assert chosen.depth == 8 and chosen.hours < 0.9 * budget
    line = next(l for l in out["text"].splitlines() if "unused" in l)
    ratio = float(line.split("--target-param-data-ratio=")[1].split()[0])
    filled = plan.plan_config(args_for(f"--target-param-data-ratio={ratio}"), chosen.config, H100, 4.8)
    assert 0.9 * budget < filled.hours <= budget
    exact = plan.main(["--depths=8", f"--hours={chosen.hours / 0.85 * 1.01}", "--report=false"])
    assert "unused" not in exact["text"]


def test_nothing_fits_and_invalid_depths():
    out = plan.main(["--depths=30,32", "--hours=0.01", "--report=false"])
    assert out["chosen"] is None and "No listed depth fits" in out["text"]
    # a ratio rounds down to a divisor of n_head: 11 heads (prime) // 4 -> 1 KV head
    out = plan.main(["--depths=20,22", "--kv-head-ratio=4", "--report=false"])
    assert [(p.depth, p.config.n_kv_head) for p in out["plans"]] == [(20, 2), (22, 1)]
    # an explicit n_kv_head that does not divide n_head is reported with the reason
    out = plan.main(["--depths=20,22", "--n-kv-head=2", "--report=false"])
    assert [p.depth for p in out["plans"]] == [20]
    assert 22 in out["invalid"] and "n_kv_head (2) must divide n_head (11)" in out["invalid"][22]


def test_comparison_shows_what_each_change_saves():
    args = args_for()
    rows = dict(plan.compare_changes(args, 20, H100, 4.8))
    ref = rows["reference"]
    c = ref.config
    assert rows["tied embeddings"].params["total"] == ref.params["total"] - c.vocab_size * c.n_embd
    assert rows["MLP 3x"].params["mlp"] == ref.params["mlp"] * 3 // 4
    assert rows["seq 1024"].params == ref.params and rows["seq 1024"].flops_per_token < ref.flops_per_token
    assert rows["seq 512"].flops_per_token < rows["seq 1024"].flops_per_token
    assert rows["n_kv_head = n_head // 4"].kv_bytes_per_token * 5 == ref.kv_bytes_per_token
    for label in ("GELU", "SiLU", "softcap off", "RoPE base 100000"):
        assert (rows[label].params, rows[label].flops_per_token) == (ref.params, ref.flops_per_token)
    together = rows["all together"].config
    assert (together.tie_embeddings, together.sequence_len, together.mlp_ratio, together.n_kv_head,
            together.activation, together.softcap, together.rope_base) == (True, 1024, 3.0, 2, "silu", None, 100000.0)
    assert "your flags" not in rows
    # at a depth where n_head // 4 does not divide n_head, the ratio rounds down to a divisor
    rows = dict(plan.compare_changes(args, 22, H100, 4.8))
    assert rows["n_kv_head = n_head // 4"].config.n_kv_head == 1
    assert "your flags" in dict(plan.compare_changes(args_for("--mlp-ratio=3"), 20, H100, 4.8))


def test_chars_per_token_from_tokenizer_evaluation(base):
    from nanochat.report import write_section
    value, source = plan.resolve_chars_per_token(None)
    assert value == plan.DEFAULT_CHARS_PER_TOKEN and source.startswith("default")
    write_section("Tokenizer evaluation", "table", {"bytes_per_token": 4.2})
    assert plan.resolve_chars_per_token(None)[0] == 4.2
    write_section("Tokenizer evaluation", "table", {"chars_per_token": 5.1, "bytes_per_token": 5.3})
    assert plan.resolve_chars_per_token(None)[0] == 5.1
    assert plan.resolve_chars_per_token(4.0) == (4.0, "--chars-per-token")


def test_writes_budget_plan_section(base):
    out = plan.main(["--depths=8:12:2", "--hours=0.5", "--gpus=8"])
    path = os.path.join(str(base), "report", "budget-plan.json")
    with open(path) as f:
        metrics = json.load(f)["metrics"]
    assert metrics["depth"] == out["chosen"].depth and metrics["parameters"] == out["chosen"].params["total"]
    assert metrics["estimated_hours"] == pytest.approx(out["chosen"].hours)
    assert "gpu_hours" not in metrics  # planned hours must not count as spent in the report's cost
    with open(path[:-5] + ".md") as f:
        assert "What each planned change saves" in f.read()


@pytest.mark.parametrize("flags,named", [
    (["--gpus=0"], "--gpus"), (["--gpu=x100"], "--gpu"), (["--hours=-1"], "--hours"), (["--mfu=1.5"], "--mfu"),
    (["--mfu=0"], "--mfu"), (["--depths=abc"], "--depths"), (["--depths=0:4"], "--depths"), (["--reserve=1"], "--reserve"),
    (["--n-kv-head=-1"], "--n-kv-head"), (["--mlp-ratio=0"], "--mlp-ratio"), (["--tie-embeddings=maybe"], "--tie-embeddings"),
    (["--activation=relu"], "--activation"), (["--softcap=-1"], "--softcap"), (["--no-such-flag"], "--no-such-flag"),
])
def test_cli_errors_name_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as e:
        plan.get_args(flags)
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "scripts.plan", "--depths=8,10", "--hours=0.2", "--report=false"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Chosen: depth 10" in r.stdout and "scripts.base_train -- --depth=10" in r.stdout
