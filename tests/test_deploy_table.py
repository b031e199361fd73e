"""benchmarks/deploy_table.py: each runtime's dense and pruned model timed as one group (or all together)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("deploy_table", ROOT / "benchmarks" / "deploy_table.py")
deploy_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(deploy_table)


@pytest.mark.slow
@pytest.mark.parametrize("all_interleaved", [False, True])
def test_speed_part_times_every_runtime_in_its_own_group(tmp_path, monkeypatch, all_interleaved):
    import dynamicvit.runtime.bench as bench

    groups = []
    real = bench.compare_throughput
    monkeypatch.setattr(bench, "compare_throughput", lambda models, *a, **k: groups.append(list(models)) or real(models, *a, **k))
    argv = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=4,depth=4,embed_dim=48,num_heads=3",
            "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    args = deploy_table.parse_args(argv + (["--all-interleaved"] if all_interleaved else []))
    text, data = deploy_table.speed_part(args, tmp_path)
    runtimes = ("eager", "compile", "ort", "ort int8")
    if all_interleaved:
        assert len(groups) == 1 and len(groups[0]) == 8 and "across all eight models" in text
    else:
        assert groups == [[f"{rt} dense", f"{rt} pruned"] for rt in runtimes] and "within each runtime" in text
    assert set(data["latency_ms"][1]) == {f"{rt} {m}" for rt in runtimes for m in ("dense", "pruned")}
    assert "| eager: pruned vs dense |" in text


def test_ort_settings_times_three_groups(capsys):
    spec = importlib.util.spec_from_file_location("ort_settings", ROOT / "benchmarks" / "ort_settings.py")
    ort_settings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ort_settings)
    args = ort_settings.parse_args(["--model", "vit_tiny_patch16_224", "--model-kwargs",
                                    "img_size=32,patch_size=4,depth=4,embed_dim=48,num_heads=3",
                                    "--repeats", "1", "--warmup", "0", "--threads", "1"])
    out = ort_settings.run(args)
    assert [t[0] for t in out] == ["A", "B", "C"]
    assert set(out["C: ONNX Runtime, opset 18 and 20, no spinning"]) == {f"ort{o} {m}" for o in (18, 20) for m in ("dense", "pruned")}
    assert all(v > 0 for group in out.values() for v in group.values())
    assert "ort20 pruned vs ort20 dense" in capsys.readouterr().out
