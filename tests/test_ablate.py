"""The ablation: its statistics on hand-made numbers (nanochat/ablation.py, checked against closed forms), the
variants it trains and the flags it hands base_train (through a stand-in that writes a known curve), and tiny real
runs on the fixture text: equal FLOPs, two seeds, the table, the reference's compute multiplier of 1, the report."""
import json
import math
import os

import pytest

from conftest import FIXTURE_CHAT, FIXTURE_TEXT, require_shared_data
from nanochat import ablation
from nanochat.report import get_report_dir, read_section_metrics, slugify, write_section
from scripts import ablate

# -----------------------------------------------------------------------------
# statistics


def test_mean_std_is_the_sample_standard_deviation():
    assert ablation.mean_std([1.0, 2.0, 3.0, 6.0]) == (3.0, math.sqrt(14 / 3))
    assert ablation.mean_std([2.5]) == (2.5, 0.0)
    with pytest.raises(ValueError):
        ablation.mean_std([])


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.0, 4.5, 30.0])
def test_t_p_value_matches_closed_forms(t):
    # two-sided tail of Student's t where the CDF has a closed form: df 1 (Cauchy), 2 and 4
    assert ablation.t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-12)
    assert ablation.t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    u = t * t / 4  # df 4: F(t) = 1/2 + 3/8 * t/sqrt(1+u) * (1 - u / (3 (1+u)))
    cdf4 = 0.5 + 0.375 * t / math.sqrt(1 + u) * (1 - u / (3 * (1 + u)))
    assert ablation.t_two_sided_p(t, 4) == pytest.approx(2 * (1 - cdf4), abs=1e-12)


def test_t_p_value_at_table_critical_values():
    assert ablation.t_two_sided_p(2.776445105, 4) == pytest.approx(0.05, abs=1e-8)
    assert ablation.t_two_sided_p(12.70620474, 1) == pytest.approx(0.05, abs=1e-8)
    assert ablation.t_two_sided_p(1.959963985, 1e7) == pytest.approx(0.05, abs=1e-6)  # the normal limit
    with pytest.raises(ValueError):
        ablation.t_two_sided_p(1.0, 0)


def test_t_critical_inverts_the_p_value():
    assert ablation.t_critical(4) == pytest.approx(2.776445105, rel=1e-8)
    assert ablation.t_critical(2) == pytest.approx(4.302652730, rel=1e-8)
    assert ablation.t_critical(1, p=0.5) == pytest.approx(1.0, rel=1e-9)  # Cauchy quartile


def test_welch_rule_on_hand_made_seeds():
    ref = [1.00, 1.10, 0.90]  # mean 1.0, std 0.1
    far = ablation.welch_test(ref, [1.30, 1.40, 1.20])  # +0.3: se = sqrt(2 * 0.01 / 3), t = 3.674, df = 4
    assert far["diff"] == pytest.approx(0.3) and far["se"] == pytest.approx(math.sqrt(0.02 / 3))
    assert far["t"] == pytest.approx(0.3 / math.sqrt(0.02 / 3)) and far["df"] == pytest.approx(4.0)
    assert far["p"] == pytest.approx(ablation.t_two_sided_p(far["t"], 4)) and far["p"] < 0.05 and far["beyond_noise"]
    near = ablation.welch_test(ref, [1.15, 1.25, 1.05])  # +0.15: t = 1.84 at df 4, p ~ 0.14
    assert 0.1 < near["p"] < 0.2 and not near["beyond_noise"]
    # unequal spreads and sizes: Welch-Satterthwaite degrees of freedom
    w = ablation.welch_test([1.0, 1.2], [2.0, 2.1, 2.2, 2.3])
    v1, v2 = 0.02 / 2, (0.05 / 3) / 4
    assert w["df"] == pytest.approx((v1 + v2) ** 2 / (v1 ** 2 / 1 + v2 ** 2 / 3))
    # no spread at all: any difference is beyond noise, none is not
    assert ablation.welch_test([1.0, 1.0], [1.5, 1.5])["beyond_noise"]
    assert ablation.welch_test([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
    with pytest.raises(ValueError, match=">= 2 seeds"):
        ablation.welch_test([1.0], [1.0, 2.0])


def test_paired_rule_on_hand_made_seeds():
    """Seeds shared by reference and variant: a small, consistent difference is beyond noise for the paired test
    while the seeds' own spread hides it from Welch's unpaired one."""
    ref, var = [2.00, 2.40, 2.20], [1.97, 2.38, 2.17]  # differences -0.03, -0.02, -0.03
    paired = ablation.paired_test(ref, var)
    assert paired["diff"] == pytest.approx(-0.08 / 3) and paired["diff_std"] == pytest.approx(math.sqrt(1 / 3) / 100)
    assert paired["df"] == 2 and paired["t"] == pytest.approx(-8.0)
    assert paired["p"] == pytest.approx(1 - 8 / math.sqrt(66), abs=1e-12) and paired["beyond_noise"]  # df 2 closed form
    assert paired["ci"] == pytest.approx(4.302652730 * paired["se"]) and paired["ci"] < abs(paired["diff"])
    assert not ablation.welch_test(ref, var)["beyond_noise"]
    mixed = ablation.paired_test(ref, [2.01, 2.38, 2.21])  # +0.01, -0.02, +0.01
    assert mixed["p"] > 0.5 and not mixed["beyond_noise"]
    assert ablation.paired_test([1.0, 2.0], [1.5, 2.5])["p"] == 0.0  # the same difference every seed
    assert ablation.paired_test([1.0, 2.0], [1.0, 2.0])["p"] == 1.0
    with pytest.raises(ValueError, match=">= 2 pairs"):
        ablation.paired_test([1.0, 2.0], [1.0, 2.0, 3.0])


POWER_LAW = [(0, 4.0)] + [(f, 10 * f ** -0.1) for f in (1e9, 3e9, 1e10, 3e10, 1e11, 3e11, 1e12)]  # a line in log-log; step 0 ignored


def test_flops_to_reach_interpolates_and_extrapolates_in_log_log():
    bpb = lambda f: 10 * f ** -0.1
    assert ablation.flops_to_reach(POWER_LAW, bpb(5e10)) == (pytest.approx(5e10, rel=1e-9), "interpolated")
    assert ablation.flops_to_reach(POWER_LAW, bpb(4e12)) == (pytest.approx(4e12, rel=1e-9), "extrapolated")
    assert ablation.flops_to_reach(POWER_LAW, bpb(2e8)) == (pytest.approx(2e8, rel=1e-9), "extrapolated")
    # the reference's own final value: its final FLOPs, exactly
    assert ablation.compute_multiplier(POWER_LAW, POWER_LAW[-1][1], 1e12) == (1.0, "interpolated")
    assert ablation.compute_multiplier(POWER_LAW, bpb(2.5e11), 1e12) == (pytest.approx(0.25, rel=1e-9), "interpolated")
    assert ablation.compute_multiplier(POWER_LAW, bpb(3e12), 1e12) == (pytest.approx(3.0, rel=1e-9), "extrapolated")


def test_flops_to_reach_takes_the_last_crossing_and_flat_ends():
    # log-log segments; the curve dips to 2.0, rises to 2.5, then falls to 1.5: 2.2 is crossed three times
    curve = [(1.0, 3.0), (10.0, 2.0), (100.0, 2.5), (1000.0, 1.5)]
    f, how = ablation.flops_to_reach(curve, 2.2)
    frac = (math.log(2.2) - math.log(2.5)) / (math.log(1.5) - math.log(2.5))
    assert how == "interpolated" and f == pytest.approx(math.exp(math.log(100) + frac * math.log(10)), rel=1e-12)
    assert ablation.flops_to_reach([(1.0, 2.0), (10.0, 2.0), (100.0, 2.0)], 1.5) == (math.inf, "not reached")
    with pytest.raises(ValueError, match="--eval-every"):
        ablation.flops_to_reach([(0, 3.0), (10.0, 2.0)], 2.0)


def test_loss_rise_is_the_largest_rise_over_the_running_minimum():
    assert ablation.loss_rise([5.0, 4.0, 4.5, 3.0, 3.2]) == pytest.approx(0.5)
    assert ablation.loss_rise([5.0, 4.0, 3.0]) == 0.0  # a falling loss never rises
    assert ablation.loss_rise([5.0, 4.0, float("nan"), 3.0]) == math.inf  # a divergence is not a number to average
    assert ablation.loss_rise([5.0, float("inf")]) == math.inf


def test_mean_curve_averages_seeds_pointwise():
    assert ablation.mean_curve([[(0, 3.0), (5, 2.0)], [(0, 4.0), (5, 1.0)]]) == [(0, 3.5), (5, 1.5)]
    with pytest.raises(ValueError, match="different FLOPs"):
        ablation.mean_curve([[(0, 3.0), (5, 2.0)], [(0, 4.0), (6, 1.0)]])

# -----------------------------------------------------------------------------
# variants, flags and the table (base_train replaced by a stand-in that writes a known curve)


def test_variants_cover_every_planned_change():
    labels = [label for label, _ in ablate.variants(256)]
    assert labels[0] == "reference" and labels[-1] == "all together"
    flags = " ".join(" ".join(f) for _, f in ablate.variants(256))
    for knob in ("--tie-embeddings=true", "--max-seq-len=128", "--max-seq-len=64", "--mlp-ratio=3", "--mlp-ratio=2.5",
                 "--kv-head-ratio=4", "--activation=gelu", "--activation=silu", "--softcap=0", "--rope-base=100000"):
        assert knob in flags


def fake_base_train(monkeypatch, seen, offsets):
    """Replace base_train.main: parse the flags with base_train's own parser, record the config per tag and
    write a power-law validation curve (FLOPs = 1e9 x step) shifted by offsets[label][seed - 42]."""
    from nanochat.checkpoint import checkpoints_root
    from nanochat.recipe import config_from_flags
    from scripts import base_train

    def fake_main(argv):
        args = base_train.get_args(argv)
        seen[args.model_tag] = config_from_flags(args, 512)
        label = next(k for k in offsets if args.model_tag.startswith(ablate.run_tag(k, "")))
        shift = offsets[label][args.seed - 42]
        run_dir = os.path.join(checkpoints_root("base"), args.model_tag)
        os.makedirs(run_dir, exist_ok=True)
        records = [{"step": s, "val_bpb": 10 * (1e9 * max(s, 1)) ** -0.1 + shift, "total_training_flops": 1e9 * s}
                   for s in range(0, 101, args.eval_every)]
        # training losses falling 0.01 a step, with a spike of 0.3 at step 50: a rise of 0.29 over the running minimum
        final = records[-1]["val_bpb"]
        records += [{"step": s, "loss": 5 - 0.01 * s + 0.3 * (s == 50)} for s in range(1, 101)]
        with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return {"val_bpb": final, "steps": 100}
    monkeypatch.setattr(base_train, "main", fake_main)


def test_each_variant_is_the_reference_plus_its_change_over_seeds(monkeypatch, base_dir):
    """ablate hands base_train its reference architecture flags (base_train's flags at tiny-scale defaults, here
    with --mlp-ratio=3.5) then the variant's change, once per seed; the reference is always run."""
    from nanochat.recipe import config_from_flags, model_flags, planned_changes
    seen = {}
    shifts = {"reference": [0.0, 0.01, 0.02], "context 128": [0.5, 0.51, 0.52], "all together": [-0.011, 0.012, 0.017]}
    fake_base_train(monkeypatch, seen, shifts)
    out = ablate.main(["--mlp-ratio=3.5", "--only=context 128|all together", "--seeds=3", "--seed=42",
                       "--sft-steps=0", "--eval-every=20"])
    assert [r["label"] for r in out["variants"]] == ["reference", "context 128", "all together"]
    reference = dict(ablate.TINY_SCALE, mlp_ratio=3.5)
    together = {**reference, **dict(planned_changes(256))["all together"]}
    expect = {"reference": reference, "context-128": {**reference, "max_seq_len": 128}, "all-together": together}
    assert seen == {f"ablate-{k}-s{s}": config_from_flags(model_flags(**v), 512) for k, v in expect.items() for s in (42, 43, 44)}
    by = {r["label"]: r for r in out["variants"]}
    final = 10 * 1e11 ** -0.1
    for label, shift in shifts.items():
        assert by[label]["text_bpb"]["values"] == pytest.approx([final + x for x in shift])
        mean, std = ablation.mean_std(shift)
        assert by[label]["text_bpb"]["mean"] == pytest.approx(final + mean) and by[label]["text_bpb"]["std"] == pytest.approx(std)
        assert "chat_bpb" not in by[label]
    # context 128 is worse by exactly 0.5 at every seed; all together differs by -0.011, +0.002, -0.003
    text = by["context 128"]["text_bpb"]
    assert text["diff"] == pytest.approx(0.5) and text["p"] < 1e-9 and text["beyond_noise"]
    together = by["all together"]["text_bpb"]
    assert together == {**together, **ablation.paired_test([final + x for x in shifts["reference"]],
                                                           [final + x for x in shifts["all together"]])}
    assert together["diff"] == pytest.approx(-0.004) and not together["beyond_noise"]
    assert together["welch_p"] == pytest.approx(ablation.welch_test(shifts["reference"], shifts["all together"])["p"])
    assert by["reference"]["multiplier"] == pytest.approx(1.0, abs=1e-12)
    ref_curve = by["reference"]["curve"]
    assert by["context 128"]["multiplier"] == pytest.approx(
        ablation.flops_to_reach(ref_curve, by["context 128"]["text_bpb"]["mean"])[0] / 1e11)
    assert by["context 128"]["multiplier"] < 0.01 and by["all together"]["multiplier"] > 1.0
    header = out["table"].splitlines()[0]
    for column in ("text bpb mean", "text bpb std", "text p", "text beyond noise", "chat bpb mean", "chat bpb std",
                   "chat beyond noise", "compute multiplier"):
        assert column in header
    assert "| context 128 | `--max-seq-len=128` | 100 |" in out["table"] and "**yes, worse**" in out["table"]
    assert by["all together"]["loss_rise"] == pytest.approx(0.29) and out["table"].splitlines()[-1].endswith("| 0.29 |")
    metrics = read_section_metrics("Ablation")
    assert metrics["reference"] == pytest.approx(final + 0.01) and metrics["reference multiplier"] == pytest.approx(1.0)
    # --from-runs rebuilds the same table from the recorded runs, without training
    monkeypatch.setattr(base_train_module(), "main", lambda argv: pytest.fail("--from-runs trained"))
    again = ablate.main(["--mlp-ratio=3.5", f"--from-runs={os.path.join(get_report_dir(), '_ablation-runs.json')}",
                         "--sft-steps=0"])
    assert again["table"] == out["table"]


def base_train_module():
    from scripts import base_train
    return base_train


@pytest.mark.parametrize("argv,message", [
    (["--seeds=1"], "--seeds"),
    (["--only=MLP 3x|MLP 9x"], "--only: no variant named 'MLP 9x'"),
    (["--eval-every=-1"], "--eval-every"),
    (["--sft-examples-per-step=6", "--sft-device-batch-size=4"], "--sft-examples-per-step"),
])
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ablate.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unreadable_inputs_fail_before_training(tmp_path, monkeypatch):
    from scripts import base_train
    monkeypatch.setattr(base_train, "main", lambda argv: pytest.fail("trained before checking its inputs"))
    with pytest.raises(SystemExit, match="--chat-data=.*missing.jsonl"):
        ablate.main([f"--chat-data={tmp_path / 'missing.jsonl'}", "--only=SiLU"])
    (tmp_path / "bad.json").write_text('{"runs": {"SiLU": []}}')
    with pytest.raises(SystemExit, match="--from-runs=.*bad.json: not a readable _ablation-runs.json"):
        ablate.main([f"--from-runs={tmp_path / 'bad.json'}"])

# -----------------------------------------------------------------------------
# real tiny runs


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread; two OpenMP threads on a busy machine spin at every barrier."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = [f"--data={FIXTURE_TEXT}", "--depth=1", "--max-seq-len=64", "--total-batch-size=1024", "--device-batch-size=4",
        "--eval-tokens=2048", "--target-flops=2e10", "--eval-every=3", "--seeds=2"]


def test_equal_flops_runs_over_seeds_and_report(tokenizer, base_dir, one_thread):
    from nanochat.checkpoint import checkpoints_root
    write_section("Base model training", "the user's own run", metrics={"val_bpb": 1.234})
    out = ablate.main(TINY + ["--only=context 32", "--sft-steps=0"])
    section_title, _, plot, prefix = ablate.suite_names(ablate.get_args(TINY))  # the depth is in them (not 4)
    by = {r["label"]: r for r in out["variants"]}
    assert set(by) == {"reference", "context 32"}
    # equal FLOPs: the cheaper architecture gets at least as many steps; each seed has its own checkpoints
    assert by["context 32"]["steps"] >= by["reference"]["steps"] >= 4
    for label in ("reference", "context-32"):
        for seed in (42, 43):
            assert os.path.exists(os.path.join(checkpoints_root("base"), f"{prefix}-{label}-s{seed}", "log.jsonl"))
    runs = out["runs"]["reference"]
    assert [r["seed"] for r in runs] == [42, 43] and runs[0]["text_bpb"] != runs[1]["text_bpb"]  # seeds differ
    assert by["reference"]["text_bpb"]["mean"] == pytest.approx(sum(r["text_bpb"] for r in runs) / 2)
    assert by["reference"]["multiplier"] == pytest.approx(1.0, abs=1e-9)
    assert len(by["reference"]["curve"]) >= 3 and by["reference"]["curve"][0][0] == 0
    assert math.isfinite(by["context 32"]["text_bpb"]["p"])
    assert read_section_metrics(section_title)["reference"] == pytest.approx(by["reference"]["text_bpb"]["mean"])
    assert read_section_metrics("Base model training") == {"val_bpb": 1.234}  # the user's section is back
    section = open(os.path.join(get_report_dir(), f"{slugify(section_title)}.md")).read()
    assert "| context 32 |" in section and "paired t-test" in section
    assert os.path.getsize(os.path.join(get_report_dir(), plot)) > 10_000


def test_conversation_metric_after_short_sft(tokenizer, base_dir, one_thread):
    """With the shared chat data: each run is finetuned on english-chat and scored on held-out conversations."""
    from nanochat.checkpoint import checkpoints_root
    require_shared_data("chat", "sgd_dialogues.jsonl.gz")
    out = ablate.main(TINY + ["--only=SiLU", "--sft-steps=2", "--sft-examples-per-step=4",
                              f"--chat-data={os.path.join(FIXTURE_CHAT, 'questions.jsonl')}"])
    prefix = ablate.suite_names(ablate.get_args(TINY))[3]
    by = {r["label"]: r for r in out["variants"]}
    for label in ("reference", "SiLU"):
        chat = by[label]["chat_bpb"]
        assert len(chat["values"]) == 2 and all(0 < v < 20 for v in chat["values"])
        assert os.path.isdir(os.path.join(checkpoints_root("sft"), f"{prefix}-{label.lower()}-s42"))
    assert "p" in by["SiLU"]["chat_bpb"] and "chat bpb" in out["table"]


def test_recipe_suite_pins_the_reference_recipe(monkeypatch, base_dir):
    """--suite=recipe: every run gets the reference recipe's flags explicitly (so base_train's defaults may move to the
    new recipe), each variant its change on top, "new recipe" all the marked ones; names carry the depth."""
    from nanochat.recipe import RECIPE_CHANGES, REFERENCE_RECIPE, config_from_flags
    from scripts import base_train
    seen = {}

    def fake_main(argv):
        args = base_train.get_args(argv)
        seen[args.model_tag] = args
        run_dir = os.path.join(__import__("nanochat.checkpoint", fromlist=["x"]).checkpoints_root("base"), args.model_tag)
        os.makedirs(run_dir, exist_ok=True)
        shift = {"reference": 0.0}.get(args.model_tag.split("-s")[0].removeprefix("recipe-d4-"), -0.01) + 0.001 * args.seed
        with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
            f.writelines(json.dumps({"step": s, "val_bpb": 3 - 0.01 * s + shift, "total_training_flops": 1e9 * s}) + "\n"
                         for s in range(0, 41, 10))
        return {"val_bpb": 3 - 0.4 + shift, "steps": 40}
    monkeypatch.setattr(base_train, "main", fake_main)
    out = ablate.main(["--suite=recipe", "--only=value embeddings|new recipe", "--seeds=2", "--sft-steps=0", "--eval-every=10"])
    assert [r["label"] for r in out["variants"]] == ["reference", "value embeddings", "new recipe"]
    ref, ve, new = (seen[f"recipe-d4-{k}-s42"] for k in ("reference", "value-embeddings", "new-recipe"))
    for k, v in REFERENCE_RECIPE.items():
        assert getattr(ref, k) == v, k
    assert ve.value_embeds and not ref.value_embeds and ve.muon_ortho == "newton-schulz"
    marked = {k: v for _, change, on in RECIPE_CHANGES if on for k, v in change.items()}
    assert all(getattr(new, k) == v for k, v in marked.items()) and new.window_pattern == "L"
    assert config_from_flags(new, 512).value_embeds and not config_from_flags(new, 512).residual_scalars
    assert read_section_metrics("Recipe ablation d4")["reference"] == pytest.approx(2.6 + 0.0425)
    assert os.path.exists(os.path.join(get_report_dir(), "_recipe-ablation-d4-runs.json"))
    # every run's wall time is recorded, and the section says what the whole ablation took
    assert all(r["seconds"] >= 0 for runs in out["runs"].values() for r in runs)
    with open(os.path.join(get_report_dir(), "recipe-ablation-d4.md"), encoding="utf-8") as f:
        assert "The 6 timed runs took" in f.read()
    assert "ablate-reference-s42" not in seen  # the planned suite's runs are not touched
    # --resume: the recorded runs with identical settings are kept, only the new variant trains
    seen.clear()
    again = ablate.main(["--suite=recipe", "--only=value embeddings|NorMuon", "--seeds=2", "--sft-steps=0",
                         "--eval-every=10", "--resume"])
    assert sorted(seen) == ["recipe-d4-normuon-s42", "recipe-d4-normuon-s43"]
    assert [r["label"] for r in again["variants"]] == ["reference", "NorMuon", "value embeddings"]
    assert again["variants"][2]["text_bpb"] == out["variants"][1]["text_bpb"]
    seen.clear()  # other settings (here the evaluation interval) are other runs: trained again
    ablate.main(["--suite=recipe", "--only=NorMuon", "--seeds=2", "--sft-steps=0", "--eval-every=20", "--resume"])
    assert len(seen) == 4


def test_each_suite_and_depth_keeps_its_own_record():
    """A planned ablation at depth 6 must not --resume from (or overwrite) the depth-4 one, nor the recipe suite's."""
    names = {(suite, depth): ablate.suite_names(ablate.get_args([f"--suite={suite}", f"--depth={depth}"]))
             for suite in ("planned", "recipe") for depth in (4, 6)}
    for i in range(4):  # section, record, plot and checkpoint prefix: each distinct per suite and depth
        assert len({n[i] for n in names.values()}) == 4
    assert names[("planned", 4)][1] == "_ablation-runs.json"  # the recorded depth-4 runs keep their name
