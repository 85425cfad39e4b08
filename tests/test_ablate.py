import os

from conftest import require_shared_data
from nanochat.report import get_report_dir, read_section_metrics
from scripts import ablate


def test_variants_cover_every_planned_change():
    labels = [label for label, _ in ablate.variants(256)]
    assert labels[0] == "reference" and labels[-1] == "all together"
    flags = " ".join(" ".join(f) for _, f in ablate.variants(256))
    for knob in ("--tie-embeddings=true", "--max-seq-len=128", "--max-seq-len=64", "--mlp-ratio=3", "--mlp-ratio=2.5",
                 "--kv-head-ratio=4", "--activation=gelu", "--activation=silu", "--softcap=0", "--rope-base=100000"):
        assert knob in flags


def test_equal_flops_runs_and_report(tokenizer, base_dir):
    pretrain = require_shared_data("pretrain")
    data = ",".join(f"{os.path.join(pretrain, n)}:{w}" for n, w in (("wikipedia", 0.45), ("books", 0.40), ("reddit", 0.15)))
    rows = ablate.main([f"--data={data}", "--depth=1", "--max-seq-len=64", "--total-batch-size=1024",
                        "--device-batch-size=4", "--eval-tokens=2048", "--target-flops=3e9",
                        "--only=reference|MLP 3x|context 32"])
    by = {r["label"]: r for r in rows}
    assert set(by) == {"reference", "MLP 3x", "context 32"}
    # equal FLOPs: the cheaper architectures get at least as many steps
    assert by["MLP 3x"]["steps"] >= by["reference"]["steps"] and by["context 32"]["steps"] >= by["reference"]["steps"]
    metrics = read_section_metrics("Ablation")
    assert metrics["reference"] == by["reference"]["val_bpb"]
    assert "| MLP 3x |" in open(os.path.join(get_report_dir(), "ablation.md")).read()
