"""benchmarks/batch1_profile.py: the first-k baseline and the attribution of time and operators to components."""
import importlib.util
from pathlib import Path

import onnx
import torch

from dynamicvit.runtime import deploy

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("batch1_profile", ROOT / "benchmarks" / "batch1_profile.py")
batch1_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(batch1_profile)


def _args(**kw):
    argv = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=4,depth=6,embed_dim=48,num_heads=3"]
    return batch1_profile.parse_args(argv + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_first_k_keeps_the_pruned_token_counts_without_machinery():
    models = batch1_profile.build_models(_args())
    pruned, first_k = models["pruned"], models["first-k"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = first_k.forward_pruned(x)
        ref = pruned.forward_pruned(x)
    assert [k.shape for k in out.kept_indices] == [k.shape for k in ref.kept_indices]
    assert all(torch.equal(k[0], torch.arange(k.shape[1])) for k in out.kept_indices)
    # Same weights as the dense backbone, perturbed so that no two parameters are equal.
    assert models["dense"] is pruned.backbone and first_k.backbone is pruned.backbone
    norms = [p for n, p in pruned.backbone.named_parameters() if n.endswith("norm1.weight")]
    assert not torch.equal(norms[0], norms[1])


def test_onnx_nodes_are_attributed_to_blocks_and_pruning_stages(tmp_path):
    model = batch1_profile.build_models(_args())["pruned"]
    path = deploy.export_onnx(model, tmp_path / "m.onnx", verify=False).path
    components = batch1_profile.node_components(path, model.host.depth, model.prune_locs)
    by_op = {}
    for node in onnx.load(str(path)).graph.node:
        by_op.setdefault(node.op_type, []).append(components[node.name])
    assert sorted(by_op["TopK"]) == [f"pruning, stage {s}" for s in (1, 2, 3)]
    assert sorted(by_op["Softmax"]) == sorted(f"blocks, stage {batch1_profile.stage_of(i, model.prune_locs)}"
                                              for i in range(model.host.depth))
    assert by_op["Conv"] == ["patch embedding"] and by_op["Gemm"] == ["norm + head"]
    assert batch1_profile.split_pruning("pruning, stage 2", "TopK") == "pruning, stage 2: selection"
    assert batch1_profile.split_pruning("pruning, stage 2", "MatMul") == "pruning, stage 2: prediction module"


def test_eager_timeline_puts_the_machinery_between_blocks():
    models = batch1_profile.build_models(_args())
    x = torch.randn(1, 3, 32, 32)
    locs = models["pruned"].prune_locs
    result = batch1_profile.eager_profile(models["pruned"], "pruned", x, 2, locs, min)
    ops = result["ops"]
    # Every block runs the same operators in the dense and the pruned model; top-k is in the pruning rows.
    dense = batch1_profile.eager_profile(models["dense"], "dense", x, 2, locs, min)["ops"]
    assert {k: v for k, v in ops.items() if k.startswith("blocks")} == {k: v for k, v in dense.items() if k.startswith("blocks")}
    assert set(ops) - set(dense) == {f"pruning, stage {s}" for s in (1, 2, 3)}
    assert all(ops[f"pruning, stage {s}"] >= 10 for s in (1, 2, 3))
    # first-k runs through `forward` too (eager, torch.compile): no prediction module, no top-k there.
    first_k = batch1_profile.eager_profile(models["first-k"], "first-k", x, 2, locs, min)["ops"]
    assert all(first_k.get(f"pruning, stage {s}", 0) <= 3 for s in (1, 2, 3)), first_k
    with torch.no_grad():
        assert torch.equal(models["first-k"](x), models["first-k"].forward_pruned(x).logits)
    assert set(result["ms"]) >= {"patch embedding", "norm + head", "total", "pruning, stage 1"}
