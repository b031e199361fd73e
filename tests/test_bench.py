"""The benchmark: interleaved timing, peak memory, the keep-ratio sweep and its outputs. No timing assertions."""
import json
import statistics

import pytest
import torch
from PIL import Image

import dynamicvit
from dynamicvit import cli
from dynamicvit.runtime.bench import BenchResult, compare_throughput, peak_memory_mb, run_benchmark, to_markdown
from dynamicvit.runtime.flops import count_macs
from conftest import tiny_kwargs, tiny_model

KWARGS = json.dumps(tiny_kwargs())



class Recorder(torch.nn.Module):
    """Appends its name to a shared log on every forward."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x):
        self.log.append((self.name, self.training, torch.is_inference_mode_enabled()))
        return self.lin(x.flatten(1)[:, :4])


def test_compare_throughput_interleaves_and_takes_the_median():
    log = []
    models = {n: Recorder(n, log).train() for n in ("a", "b", "c")}
    threads = torch.get_num_threads()
    res = compare_throughput(models, (1, 2, 2), 3, repeats=4, warmup=2, threads=2, min_repeat_s=0.0, measure_memory=False)
    assert torch.get_num_threads() == threads == 1  # restored
    assert list(res) == ["a", "b", "c"]
    assert all(not training and inference for _, training, inference in log)  # eval mode, inference mode
    names = [n for n, _, _ in log]
    assert names[:6] == ["a", "b", "c"] * 2  # warm-up
    # One forward per repetition (min_repeat_s=0); rounds rotate the starting model.
    assert names[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    for r in res.values():
        assert isinstance(r, BenchResult) and r.batch_size == 3 and r.forwards_per_repeat == 1
        assert len(r.times_ms) == 4 and r.latency_ms == pytest.approx(statistics.median(r.times_ms))
        assert r.images_per_s == pytest.approx(3 / (r.latency_ms / 1e3))
        assert r.peak_memory_mb is None


def test_short_forwards_are_grouped_per_repetition():
    log = []
    res = compare_throughput({"a": Recorder("a", log)}, (1, 2, 2), 1, repeats=2, warmup=1, min_repeat_s=0.01, measure_memory=False)
    n = res["a"].forwards_per_repeat
    assert n > 1 and len(log) == 1 + 2 * n


class Allocates(torch.nn.Module):
    """Holds at most 8 MB of its own tensors at once: a and b (4 MB each), then b and c."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(250_000))  # 1 MB of weights

    def forward(self, x):
        a = torch.ones(1_000_000)
        b = a * 2
        del a
        c = b + 1
        return c[:1] + self.w[:1] + x.sum()


def test_cpu_peak_memory_follows_live_tensors():
    x = torch.zeros(262_144)  # 1 MB
    peak = peak_memory_mb(Allocates(), x, "cpu")
    fixed = (250_000 + 262_144) * 4 / 2**20  # weights + input
    assert peak - fixed == pytest.approx(8_000_000 / 2**20, abs=0.01)


def test_cpu_peak_memory_grows_with_batch():
    model = tiny_model().backbone.eval()
    small = peak_memory_mb(model, torch.randn(2, 3, 32, 32), "cpu")
    large = peak_memory_mb(model, torch.randn(16, 3, 32, 32), "cpu")
    weights = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    assert weights < small < large


def test_at_keep_ratio_shares_weights():
    base = tiny_model(keep_ratio=0.7)
    twin = base.at_keep_ratio(0.5)
    assert twin.keep_counts() == (32, 16, 8) and base.keep_ratio == 0.7
    assert twin.backbone is base.backbone and twin.predictors is base.predictors
    x = torch.randn(2, 3, 32, 32)
    base.set_keep_ratio(0.5)
    torch.testing.assert_close(twin.eval()(x), base.eval()(x))


def test_run_benchmark_rows():
    base = tiny_model(keep_ratio=0.7)
    rows = run_benchmark(base, [0.7, 0.5], [4, 1], repeats=2, warmup=1, threads=1)
    assert [(r["batch_size"], r["keep_ratio"]) for r in rows] == [(4, 1.0), (4, 0.7), (4, 0.5), (1, 1.0), (1, 0.7), (1, 0.5)]
    dense = count_macs(base.backbone)
    for r in rows:
        assert r["images_per_s"] > 0 and r["latency_ms"] > 0 and r["peak_memory_mb"] > 0
        assert r["threads"] == 1 and r["device"] == "cpu" and r["amp"] == "fp32" and r["img_size"] == [32, 32]
        if r["keep_ratio"] == 1.0:
            assert r["speedup"] == 1.0 and r["gmacs"] == dense.gmacs and r["keep_counts"] == []
        else:
            twin = base.at_keep_ratio(r["keep_ratio"])
            assert r["gmacs"] == count_macs(twin).gmacs and r["keep_counts"] == list(twin.keep_counts())
            assert r["macs_ratio"] == pytest.approx(r["gmacs"] / dense.gmacs) and r["macs_ratio"] < 1
    md = to_markdown(rows)
    assert md.count("\n| ") == 1 + len(rows) and "1.0 (dense)" in md and "1 threads" in md


def test_run_benchmark_from_a_dense_model_and_bf16():
    dense = tiny_model().backbone
    rows = run_benchmark(dense, [1.0, 0.5], [2], repeats=1, warmup=1, amp="bf16")
    assert [r["keep_ratio"] for r in rows] == [1.0, 0.5] and rows[0]["amp"] == "bfloat16"


def test_bad_settings():
    model = {"a": tiny_model().backbone}
    with pytest.raises(dynamicvit.ConfigError):
        compare_throughput(model, (3, 32, 32), 1, amp_dtype="fp8")
    with pytest.raises(dynamicvit.ConfigError):
        compare_throughput(model, (3, 32, 32), 1, repeats=0)
    if not torch.cuda.is_available():
        with pytest.raises(dynamicvit.ConfigError, match="CUDA is not available"):
            compare_throughput(model, (3, 32, 32), 1, device="cuda")


def test_cli_end_to_end(tmp_path, capsys):
    args = ["bench", "--model", "vit_tiny_patch16_224", "--model-kwargs", KWARGS, "--keep-ratios", "1.0,0.7",
            "--batch-sizes", "4,1", "--repeats", "2", "--warmup", "1", "--threads", "1", "--device", "cpu",
            "--output", str(tmp_path / "out")]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [(r["batch_size"], r["keep_ratio"]) for r in rows] == [(4, 1.0), (4, 0.7), (1, 1.0), (1, 0.7)]
    for r in rows:
        for key in ("keep_ratio", "batch_size", "images_per_s", "speedup", "gmacs", "latency_ms", "peak_memory_mb"):
            assert isinstance(r[key], (int, float))
    md = (tmp_path / "out" / "bench.md").read_text()
    assert md.startswith("vit_tiny_patch16_224, 32x32 px, fp32") and md.count("\n| ") == 5
    assert captured.out == md  # the table on stdout, progress elsewhere
    with Image.open(tmp_path / "out" / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] > 400


def test_cli_single_batch_size_and_errors(tmp_path, capsys):
    args = ["bench", "--model", "vit_tiny_patch16_224", "--model-kwargs", KWARGS, "--keep-ratios", "0.5",
            "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "r.json")]
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [(r["batch_size"], r["keep_ratio"]) for r in rows] == [(2, 1.0), (2, 0.5)]  # dense baseline added
    capsys.readouterr()
    assert cli.main(["bench", "--model-kwargs", KWARGS, "--keep-ratios", "1.5"]) == 2
    assert "keep-ratios" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_runs():
    rows = run_benchmark(tiny_model(), [0.7], [2], repeats=1, warmup=1, compile=True)
    assert rows[1]["compile"] is True and rows[1]["images_per_s"] > 0
    assert rows[1]["runtime"] == "compile"


def test_runtimes_side_by_side(tmp_path):
    base = tiny_model(keep_ratio=0.7)
    rows = run_benchmark(base, [0.7], [3], repeats=1, warmup=1, threads=1, runtimes=["torch", "onnxruntime"],
                         onnx_dir=tmp_path)
    assert [(r["runtime"], r["keep_ratio"]) for r in rows] == [
        ("torch", 1.0), ("torch", 0.7), ("onnxruntime", 1.0), ("onnxruntime", 0.7)]
    # Each runtime has its own dense baseline; memory is measured where it can be (eager PyTorch).
    assert [r["speedup"] for r in rows if r["keep_ratio"] == 1.0] == [1.0, 1.0]
    assert all(r["peak_memory_mb"] > 0 for r in rows if r["runtime"] == "torch")
    assert all(r["peak_memory_mb"] is None for r in rows if r["runtime"] == "onnxruntime")
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["dense.onnx", "keep0.7.onnx"]
    md = to_markdown(rows)
    assert "| onnxruntime | 0.7 | 3 |" in md and "| torch | 1.0 (dense) | 3 |" in md


def test_cli_runtime_option(tmp_path, capsys):
    args = ["bench", "--model", "vit_tiny_patch16_224", "--model-kwargs", KWARGS, "--keep-ratios", "0.7",
            "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--threads", "1", "--device", "cpu",
            "--runtime", "onnxruntime", "--output", str(tmp_path / "out")]
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert {r["runtime"] for r in rows} == {"onnxruntime"} and (tmp_path / "out" / "bench.png").is_file()
    capsys.readouterr()
    assert cli.main(["bench", "--model-kwargs", KWARGS, "--runtime", "tensorrt"]) == 2
    assert "unknown runtime" in capsys.readouterr().err
