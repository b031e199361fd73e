"""The per-image budget: each image keeps the tokens scored above calibrated thresholds, run packed.

Invariants: thresholds at 0 reproduce the dense model; the packed execution (every attention kernel)
equals the padded reference; an image's output does not depend on the batch around it; counts obey
the thresholds, the minimum and the tokens an image still has; the calibrated mean equals the fixed
budget's count; the MACs per image from the counts equal a direct count.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import dynamicvit
from dynamicvit.core import packed
from dynamicvit.core.budget import CountRecorder, calibrate_thresholds, choose_threshold
from dynamicvit.core.packed import forward_padded, set_packed_attention, stage_scores, threshold_logits
from dynamicvit.errors import CheckpointError, ConfigError
from dynamicvit.runtime.flops import _MacCounter, count_macs
from dynamicvit.runtime.image_macs import PerImageMacs, macs_summary

from conftest import scramble, tiny_model
from test_cli_deploy import checkpoint  # noqa: F401 - a Fashion-MNIST-shaped DynamicViT saved by dynamicvit

VARIANTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers_avgpool": ("vit_tiny_patch16_224", dict(reg_tokens=4, global_pool="avg", class_token=False, no_embed_class=True)),
    "lvvit": ("lvvit_s", {}),
}
VARIANT_IDS = list(VARIANTS) + [f"{v}+fused" for v in VARIANTS]
CPU_KERNELS = ("loop", "groups", "blockdiag", "padded")


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def calibrated(variant: str = "vit", keep_ratio: float = 0.5, min_keep: int = 1) -> dynamicvit.DynamicViT:
    """A tiny per-image DynamicViT with decisive predictors, calibrated on random images."""
    key, fused, _ = variant.partition("+fused")
    name, kw = VARIANTS[key]
    model = tiny_model(name, fuse_dropped=bool(fused), **kw).eval()
    for p in model.predictors:
        scramble(p, 0.5)  # scores well apart: a test image's score is never within rounding of a threshold
    calibrate_thresholds(model, [_images(16, 100), _images(16, 101)], [keep_ratio], min_keep=min_keep)
    model.set_keep_ratio(keep_ratio, budget="per-image")
    return model


@pytest.fixture(params=VARIANT_IDS, ids=VARIANT_IDS)
def model(request) -> dynamicvit.DynamicViT:
    return calibrated(request.param)


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(set(x[x >= 0].tolist()) == set(y[y >= 0].tolist()) for x, y in zip(a, b))


# -- invariants -------------------------------------------------------------------------------


def test_thresholds_at_zero_reproduce_the_dense_model(model):
    model.set_thresholds({0.7: (0.0, 0.0, 0.0)})
    model.set_keep_ratio(0.7, budget="per-image")
    x = _images(3, 1)
    with torch.no_grad():
        out = model.forward_pruned(x)
        torch.testing.assert_close(out.logits, model.backbone(x), atol=1e-5, rtol=1e-4)
    assert out.kept_counts.tolist() == [[model.num_patches] * 3] * 3


@pytest.mark.parametrize("kernel", CPU_KERNELS + ("varlen",))
def test_packed_and_padded_execution_agree(model, kernel, monkeypatch):
    if kernel == "varlen":  # the CUDA kernel's contract, on the CPU: (T, H, D) rows, int32 offsets, the longest length
        monkeypatch.setattr(packed, "_varlen_attn", lambda q: _varlen_on_cpu)
    set_packed_attention(model, kernel)
    x = _images(6, 2)
    with torch.no_grad():
        got, ref = model.forward_pruned(x), forward_padded(model, x)
    assert torch.equal(got.kept_counts, ref.kept_counts)
    assert len(set(map(tuple, got.kept_counts.tolist()))) > 1  # the images really keep different counts
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(got.kept_indices, ref.kept_indices):
        assert _same_sets(a, b)


def _varlen_on_cpu(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
    assert q.ndim == 3 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    lengths = cu_q.diff()
    assert max_q == max_k == int(lengths.max()) and int(cu_q[-1]) == q.shape[0]
    bounds = cu_q.tolist()
    out = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale).transpose(0, 1)
           for a, b in zip(bounds, bounds[1:])]
    return torch.cat(out)


def test_an_image_does_not_depend_on_the_batch_around_it(model):
    x, other = _images(5, 3), _images(4, 4)
    with torch.no_grad():
        batch = model.forward_pruned(x)
        mixed = model.forward_pruned(torch.cat([other[:2], x[2:3], other[2:]]))
        for i in range(5):
            alone = model.forward_pruned(x[i : i + 1])
            torch.testing.assert_close(alone.logits[0], batch.logits[i], atol=1e-5, rtol=1e-5)
            assert alone.kept_counts[0].tolist() == batch.kept_counts[i].tolist()
            assert _same_sets(alone.kept_indices[-1], batch.kept_indices[-1][i : i + 1])
    torch.testing.assert_close(mixed.logits[2], batch.logits[2], atol=1e-5, rtol=1e-5)


def test_counts_follow_the_thresholds_and_never_grow(model):
    x = _images(6, 5)
    t = model.config.stage_thresholds()
    with torch.no_grad():
        out = model.forward_pruned(x, return_scores=True)
        first = stage_scores(model, x, t, 0)
    above = torch.zeros(6, dtype=torch.long).index_add_(0, first.image, (first.margin >= threshold_logits(t)[0]).long())
    assert out.kept_counts[:, 0].tolist() == above.clamp(min=1).tolist()
    counts = out.kept_counts
    assert (counts[:, 1:] <= counts[:, :-1]).all() and (counts >= 1).all()
    for s, idx in enumerate(out.kept_indices):
        assert ((idx >= 0).sum(1) == counts[:, s]).all()
        if s:  # nested: a token dropped once stays dropped
            assert all(set(a[a >= 0].tolist()) <= set(b[b >= 0].tolist()) for a, b in zip(idx, out.kept_indices[s - 1]))
        # The kept tokens are those scored highest at that stage (log p(keep), NaN where already gone).
        score = out.keep_scores[s]
        for b in range(6):
            kept = idx[b][idx[b] >= 0]
            rest = torch.isfinite(score[b]) & ~torch.zeros_like(score[b], dtype=torch.bool).index_fill_(0, kept, True)
            if rest.any():
                assert score[b, kept].min() >= score[b][rest].max()


def test_thresholds_that_keep_fewer_than_the_minimum_are_clamped_and_said_so(caplog):
    model = calibrated(min_keep=5)
    model.set_thresholds({0.5: (0.999999, 0.999999, 0.999999)})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dynamicvit"), torch.no_grad():
        out = model.forward_pruned(_images(4, 6))
        model.forward_pruned(_images(4, 7))
    assert out.kept_counts.tolist() == [[5, 5, 5]] * 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "4 of 4 images scored fewer than min_keep=5" in warnings[0]  # once per model


def test_calibration_matches_the_fixed_budget_on_average():
    model = tiny_model().eval()
    for p in model.predictors:
        scramble(p, 0.5)
    sample = [_images(16, 10), _images(16, 11)]
    (cal,) = calibrate_thresholds(model, sample, [0.6])
    assert cal.target_counts == model.at_keep_ratio(0.6).keep_counts() == (38, 23, 13)
    assert all(abs(m - t) <= 0.5 for m, t in zip(cal.mean_counts, cal.target_counts)), cal
    assert cal.min_counts[0] < cal.target_counts[0] < cal.max_counts[0]  # per image, not fixed
    assert model.thresholds[0.6] == cal.thresholds and all(0 < t < 1 for t in cal.thresholds)
    assert model.budget == "fixed"  # calibration does not switch the budget
    model.set_keep_ratio(0.6, budget="per-image")
    recorder = CountRecorder(model)
    with torch.no_grad():
        for images in sample:
            recorder(images)
    assert recorder.counts().double().mean(0).tolist() == pytest.approx(cal.mean_counts)
    with pytest.raises(ConfigError, match="not a generator"):
        calibrate_thresholds(model, (b for b in sample), [0.6])


def test_a_threshold_is_placed_between_scores():
    scores = torch.tensor([[3.0, 1.0, -1.0, -float("inf")], [2.0, 0.0, -2.0, -3.0]], dtype=torch.float64)
    counts = torch.tensor([3, 4])
    t, kept, clamped = choose_threshold(scores, counts, 2, min_keep=1)
    assert kept.tolist() == [2, 2] and not clamped.any()
    # Halfway between the last score kept (0, in the second image) and the next (-1, in the first).
    assert torch.logit(torch.tensor(t, dtype=torch.float64)).item() == pytest.approx(-0.5)
    assert choose_threshold(scores, counts, 4, min_keep=1)[0] == 0.0  # everything kept
    t, kept, clamped = choose_threshold(scores, counts, 0, min_keep=1)
    assert kept.tolist() == [1, 1]


# -- settings and bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(budget="per-image"), "no calibrated thresholds for keep ratio 0.7 .*dynamicvit calibrate"),
    (dict(thresholds={0.7: (0.5, 1.0, 0.5)}), r"outside \(0, 1\)"),
    (dict(thresholds={0.7: (0.5, -0.1, 0.5)}), r"outside \(0, 1\)"),
    (dict(thresholds={0.7: (0.5, float("nan"), 0.5)}), r"outside \(0, 1\)"),
    (dict(thresholds={0.7: (0.5, 0.5)}), "2 values for 3 stages"),
    (dict(min_keep=65), "min_keep 65 is larger than the sequence .64 patch tokens."),
    (dict(min_keep=0), "min_keep must be a whole number"),
    (dict(budget="dynamic"), "budget must be one of fixed, per-image"),
])
def test_bad_settings_are_one_clear_line(change, message):
    model = tiny_model()
    with pytest.raises(ConfigError, match=message) as e:
        model.config = model._config_at(0.7, **change)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown packed attention"):
        set_packed_attention(model, "fast")


def test_settings_survive_a_checkpoint(tmp_path):
    model = calibrated("vit+fused", min_keep=2)
    model.set_thresholds({0.7: (0.1, 0.2, 0.3)})
    path = dynamicvit.save_model(model, tmp_path / "m.safetensors")
    loaded = dynamicvit.load(path).eval()
    assert loaded.budget == "per-image" and loaded.keep_ratio == 0.5 and loaded.config.min_keep == 2
    assert loaded.thresholds == model.thresholds
    x = _images(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert dynamicvit.load_model(path, keep_ratio=0.7).budget == "per-image"
    with pytest.raises(ConfigError, match="no calibrated thresholds for keep ratio 0.6"):
        dynamicvit.load_model(path, keep_ratio=0.6)
    # Another keep ratio asked of create_model starts at the fixed budget (the thresholds come along).
    other = dynamicvit.create_model("vit_tiny_patch16_224", checkpoint_path=path, keep_ratio=0.6)
    assert other.budget == "fixed" and other.thresholds == model.thresholds


@pytest.mark.parametrize("bad, message", [
    ({"thresholds": {"0.5": [0.5, 1.5, 0.1]}}, "recalibrate"),
    ({"thresholds": {"0.5": [0.5, 0.1]}}, "one threshold"),
    ({"budget": "sometimes"}, "expected one of fixed, per-image"),
    ({"min_keep": "4"}, "min_keep '4'"),
    ({"budget": "per-image", "thresholds": {}}, "hold no thresholds for it"),
])
def test_bad_budget_settings_in_a_file_are_refused_before_building(bad, message):
    from dynamicvit.weights.formats import check_settings

    good = dynamicvit.weights.formats.model_settings(tiny_model(keep_ratio=0.5))
    with pytest.raises(CheckpointError, match=message):
        check_settings({**good, **bad}, "m.safetensors")


def test_export_and_macs_counting_refuse_the_per_image_budget_with_the_way_out(tmp_path):
    model = calibrated()
    with pytest.raises(ConfigError, match="ONNX export of the per-image budget is not supported.*budget='fixed'"):
        dynamicvit.export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ConfigError, match="depend on each image's kept counts"):
        count_macs(model)


# -- MACs per image ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vit", "vit+fused", "lvvit+fused", "registers_avgpool+fused"])
def test_macs_per_image_from_the_counts_equal_a_direct_count(variant):
    model = calibrated(variant)
    formula = PerImageMacs.of(model)
    # The fixed budget is the same formula at its own counts.
    for r in (1.0, 0.7, 0.5):
        fixed = model.at_keep_ratio(r, budget="fixed")
        assert formula(fixed.keep_counts()) == count_macs(fixed).total
    seen = set()
    with torch.inference_mode():
        for i in range(6):
            counter = _MacCounter(lambda args: None)
            with counter:  # the image run alone, as counted
                counts = model.forward_pruned(_images(1, 20 + i)).kept_counts[0].tolist()
            assert not counter.uncounted
            assert formula(counts) == sum(counter.macs.values()), counts
            seen.add(tuple(counts))
    assert len(seen) > 1
    summary = macs_summary(formula.per_image(torch.tensor(sorted(seen))), bins=3)
    assert summary["images"] == len(seen) and summary["min_gmacs"] < summary["mean_gmacs"] < summary["max_gmacs"]
    assert sum(summary["histogram"]["counts"]) == len(seen)


# -- compile -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_per_image_model_agrees_and_compiles_once_per_stage():
    from torch._dynamo.utils import counters

    model = calibrated("vit+fused")
    torch._dynamo.reset()
    counters.clear()
    compiled = dynamicvit.compile(model, backend="eager")
    graphs = []
    with torch.inference_mode():
        for n in (3, 5, 7, 4, 1):  # a single image takes its own path
            x = _images(n, 30 + n)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2] == graphs[3]  # new counts and batch sizes reuse the dynamic graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen_attn needs a CUDA GPU")
def test_varlen_on_a_gpu_matches_the_padded_reference():
    model = calibrated("vit+fused").cuda()
    set_packed_attention(model, "varlen")
    x = _images(8, 40).cuda()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        got, ref = model.forward_pruned(x), forward_padded(model, x)
    assert torch.equal(got.kept_counts, ref.kept_counts)
    torch.testing.assert_close(got.logits.float(), ref.logits.float(), atol=3e-2, rtol=3e-2)


# -- the command line ----------------------------------------------------------------------------

def _cli(capsys, *argv) -> tuple[int, str, str]:
    from dynamicvit import cli

    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.fashion_mnist
def test_calibrate_then_eval_flops_visualize_and_predict(tmp_path, checkpoint, capsys):
    import json

    from conftest import require_fashion_mnist

    require_fashion_mnist()
    data = ["--subset", "300", "--num-workers", "0"]
    cal = tmp_path / "cal.safetensors"
    code, out, err = _cli(capsys, "calibrate", "--checkpoint", checkpoint, "--keep-ratio", "0.5,0.7", "--output",
                          cal, "--json", *data)
    assert code == 0, err
    report = json.loads(out)
    assert [c["keep_ratio"] for c in report["calibration"]] == [0.5, 0.7] and report["keep_ratio"] == 0.7
    for c in report["calibration"]:
        assert all(abs(m - t) <= 0.5 for m, t in zip(c["mean_counts"], c["target_counts"]))
    # The input is untouched, the output uses the per-image budget.
    assert dynamicvit.load(checkpoint).budget == "fixed" and dynamicvit.load(cal).budget == "per-image"

    code, out, err = _cli(capsys, "eval", "--checkpoint", cal, "--keep-ratio", "0.5,0.7", "--json", *data)
    assert code == 0, err
    per_image = json.loads(out)["results"]
    code, out, _ = _cli(capsys, "eval", "--checkpoint", cal, "--keep-ratio", "0.5,0.7", "--budget", "fixed", "--json", *data)
    fixed = json.loads(out)["results"]
    for p, f, c in zip(per_image, fixed, report["calibration"]):
        assert p["budget"] == "per-image" and f["budget"] == "fixed"
        assert p["mean_keep_counts"] == pytest.approx(c["mean_counts"])  # the same 300 images
        assert p["gmacs"] == pytest.approx(f["gmacs"], rel=0.05) and p["gmacs_std"] > 0

    code, out, err = _cli(capsys, "flops", "--checkpoint", cal, "--keep-ratio", "0.5", "--dataset", "fashion-mnist",
                          "--json", "--bins", "5", *data)
    assert code == 0, err
    flops = json.loads(out)
    assert flops["mean_gmacs"] == pytest.approx(per_image[0]["gmacs"]) and sum(flops["histogram"]["counts"]) == 300
    assert flops["min_gmacs"] < flops["fixed_budget_gmacs"] < flops["max_gmacs"]
    by_class = flops["by_class"]  # what the predictors spend per class
    assert len(by_class) == 10 and sum(c["images"] for c in by_class.values()) == 300
    assert sum(c["images"] * c["mean_gmacs"] for c in by_class.values()) / 300 == pytest.approx(flops["mean_gmacs"])

    code, _, err = _cli(capsys, "visualize", "--checkpoint", cal, "--dataset", "fashion-mnist", "--num-samples", "3",
                        "--output", tmp_path / "pics", "--contact-sheet")
    assert code == 0, err
    assert len(list((tmp_path / "pics").glob("*.png"))) == 4
    image = next((tmp_path / "pics").glob("fashion-mnist*.png"))
    code, out, err = _cli(capsys, "predict", image, "--checkpoint", cal, "--json")
    assert code == 0, err
    (result,) = json.loads(out)["results"]
    assert len(result["kept_counts"]) == 3 and json.loads(out)["runtime"] == "eager"


@pytest.mark.fashion_mnist
def test_bad_per_image_requests_are_one_line_and_exit_2(tmp_path, checkpoint, capsys):
    from conftest import require_fashion_mnist

    require_fashion_mnist()
    code, _, err = _cli(capsys, "eval", "--checkpoint", checkpoint, "--budget", "per-image", "--subset", "8")
    assert code == 2 and "no calibrated thresholds for keep ratio 0.7" in err and "dynamicvit calibrate" in err
    code, _, err = _cli(capsys, "calibrate", "--checkpoint", checkpoint, "--keep-ratio", "0.5", "--min-keep", "50",
                        "--output", tmp_path / "c.safetensors", "--subset", "8", "--num-workers", "0")
    assert code == 2 and "min_keep 50 is larger than the sequence (49 patch tokens)" in err
    assert not (tmp_path / "c.safetensors").exists()
    code, _, err = _cli(capsys, "calibrate", "--checkpoint", checkpoint, "--keep-ratio", "0.5", "--output",
                        checkpoint, "--overwrite")
    assert code == 2 and "is the input checkpoint" in err
    code, _, err = _cli(capsys, "export", "--checkpoint", checkpoint, "--budget", "per-image", "--output",
                        tmp_path / "m.onnx")
    assert code == 2 and "no calibrated thresholds" in err and err.count("\n") == 1


def test_per_image_on_convnext_is_one_line_and_exit_2(capsys):
    cnx = ["--model", "convnext_tiny", "--img-size", "96", "--prune-locs", "1,2,3",
           "--model-kwargs", '{"depths": [1, 1, 4, 1], "dims": [16, 32, 64, 128]}']
    code, _, err = _cli(capsys, "flops", *cnx, "--budget", "per-image")
    assert code == 2 and "--budget per-image is for token models" in err and err.count("\n") == 1
    code, _, err = _cli(capsys, "bench", *cnx, "--budget", "per-image", "--repeats", "1", "--keep-ratios", "0.7")
    assert code == 2 and "--budget per-image is for token models" in err


def test_bench_rows_of_the_per_image_budget():
    from dynamicvit.runtime.bench import run_benchmark, to_markdown

    model = calibrated()
    rows = run_benchmark(model, [0.5], [3], repeats=1, warmup=1)
    dense, row = rows
    assert row["budget"] == "per-image" and dense["budget"] is None
    assert len(row["keep_counts"]) == 3 and all(isinstance(c, float) for c in row["keep_counts"])
    assert 0 < row["macs_ratio"] < 1 and "0.5 per-image (mean GMACs)" in to_markdown(rows)
    fixed = run_benchmark(model, [0.5], [3], repeats=1, warmup=1, budget="fixed")[1]
    assert fixed["budget"] == "fixed" and fixed["keep_counts"] == [32, 16, 8]


@pytest.mark.slow
def test_speed_benchmark_dry_run(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "per_image_speed.py"
    spec = importlib.util.spec_from_file_location("per_image_speed", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--dry-run", "--batch-sizes", "1,3", "--kernels", "loop,padded", "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert "| 3 | per-image, padded |" in table and "| 1 | fixed |" in table and "| 1 | fixed, each image's counts |" in table
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 7
    for r in rows:  # the same mean token count per stage in every row of a batch size
        fixed = next(f for f in rows if f["model"] == "fixed" and f["batch_size"] == r["batch_size"])
        assert r["mean_counts"] == pytest.approx(fixed["mean_counts"], abs=0.5)
        assert r["images_per_call"] == (4 if r["batch_size"] == 1 else 1)  # batch 1: the whole pool per timed call


def _speed_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "per_image_speed.py"
    spec = importlib.util.spec_from_file_location("per_image_speed", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_speed_benchmarks_control_row_runs_the_fixed_path_at_each_images_counts():
    """The batch-1 control row keeps, in each image, the per-image budget's counts: the same logits."""
    script = _speed_script()
    model = calibrated()
    pool = _images(6, 7)
    with torch.no_grad():
        per_image = model.forward_pruned(pool)
        fixed = model.at_keep_ratio(0.5, budget="fixed").eval()
        control = script.CountsPass(fixed, pool, per_image.kept_counts)
        outs = []
        for i in range(len(pool)):  # a pool of one image per call, to compare each image's logits
            control.pool, control.counts = pool[i : i + 1], [tuple(int(c) for c in per_image.kept_counts[i])]
            outs.append(control(pool[:1]))
    assert len(set(map(tuple, per_image.kept_counts.tolist()))) > 1  # the images keep different counts
    torch.testing.assert_close(torch.cat(outs), per_image.logits, atol=1e-5, rtol=1e-4)
    assert "keep_counts" not in vars(fixed) and fixed.keep_counts() == model.at_keep_ratio(0.5, budget="fixed").keep_counts()


def test_speed_benchmark_runs_the_whole_pool_in_each_timed_call_at_batch_1():
    script = _speed_script()
    seen = []
    script.PoolPass(lambda x: seen.append(x.clone()) or x.sum(), torch.arange(5.0).view(5, 1))(torch.zeros(1, 1))
    assert torch.equal(torch.cat(seen), torch.arange(5.0).view(5, 1))


def test_auto_takes_varlen_on_a_gpu_in_half_precision(monkeypatch):
    from dynamicvit.core.packed import resolve_kernel

    q = torch.zeros(4, 2, 8)
    assert resolve_kernel("auto", q) == "loop" and resolve_kernel("padded", q) == "padded"

    class OnCuda:  # what resolve_kernel reads of a query tensor on a GPU
        is_cuda, dtype = True, torch.bfloat16

    assert resolve_kernel("auto", OnCuda()) == "varlen"  # torch ships torch.nn.attention.varlen
    OnCuda.dtype = torch.float32
    assert resolve_kernel("auto", OnCuda()) == "padded"
    with pytest.raises(ConfigError, match="runs on a CUDA GPU in fp16/bf16 only"):
        packed._varlen_attn(q)
