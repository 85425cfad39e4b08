import os

from conftest import FIXTURE_TEXT
from nanochat.report import get_report_dir, read_section_metrics
from scripts import ablate


def test_variants_cover_every_planned_change():
    labels = [label for label, _ in ablate.variants(256)]
    assert labels[0] == "reference" and labels[-1] == "all together"
    flags = " ".join(" ".join(f) for _, f in ablate.variants(256))
    for knob in ("--tie-embeddings=true", "--max-seq-len=128", "--max-seq-len=64", "--mlp-ratio=3", "--mlp-ratio=2.5",
                 "--kv-head-ratio=4", "--activation=gelu", "--activation=silu", "--softcap=0", "--rope-base=100000"):
        assert knob in flags


def test_each_variant_is_the_reference_plus_its_change(monkeypatch, base_dir):
    """ablate hands base_train its reference architecture flags (base_train's flags at tiny-scale
    defaults, here with --mlp-ratio=3.5) followed by the variant's change: checked through base_train's
    own parser and config rule, without training."""
    from nanochat.gpt import config_from_flags, model_flags, planned_changes
    from scripts import base_train
    seen = {}

    def fake_main(argv):
        args = base_train.get_args(argv)
        seen[args.model_tag] = config_from_flags(args, 512)
        return {"val_bpb": 1.0, "steps": 1}
    monkeypatch.setattr(base_train, "main", fake_main)
    rows = ablate.main(["--mlp-ratio=3.5", "--only=reference|context 128|all together"])
    assert [r["label"] for r in rows] == ["reference", "context 128", "all together"]
    reference = dict(ablate.TINY_SCALE, mlp_ratio=3.5)
    together = {**reference, **dict(planned_changes(256))["all together"]}
    assert seen == {"ablate-reference": config_from_flags(model_flags(**reference), 512),
                    "ablate-context-128": config_from_flags(model_flags(**{**reference, "max_seq_len": 128}), 512),
                    "ablate-all-together": config_from_flags(model_flags(**together), 512)}
    assert seen["ablate-all-together"].mlp_ratio == 3.0 and seen["ablate-reference"].n_layer == 4


def test_equal_flops_runs_and_report(tokenizer, base_dir):
    rows = ablate.main([f"--data={FIXTURE_TEXT}", "--depth=1", "--max-seq-len=64", "--total-batch-size=1024",
                        "--device-batch-size=4", "--eval-tokens=2048", "--target-flops=3e9",
                        "--only=reference|MLP 3x|context 32"])
    by = {r["label"]: r for r in rows}
    assert set(by) == {"reference", "MLP 3x", "context 32"}
    # equal FLOPs: the cheaper architectures get at least as many steps
    assert by["MLP 3x"]["steps"] >= by["reference"]["steps"] and by["context 32"]["steps"] >= by["reference"]["steps"]
    metrics = read_section_metrics("Ablation")
    assert metrics["reference"] == by["reference"]["val_bpb"]
    assert "| MLP 3x |" in open(os.path.join(get_report_dir(), "ablation.md")).read()
