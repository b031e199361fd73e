"""Two training processes on the CPU (gloo), launched with torchrun, stay in sync."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dynamicvit
from dynamicvit.weights.build import create_backbone

MICRO = dict(img_size=16, patch_size=4, embed_dim=24, depth=4, num_heads=2, num_classes=4)

# Each rank trains, then writes a checksum of every weight, before and after training.
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch.utils.data import TensorDataset
    from dynamicvit.training.config import TrainConfig
    from dynamicvit.training.loop import train
    from dynamicvit.training.models import build_models
    from dynamicvit.training.state import seed_everything

    teacher, out = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    cfg = TrainConfig(
        teacher=teacher, output=out, epochs=2, batch_size=4, lr=1e-3, warmup_epochs=0,
        freeze_backbone_epochs=1, max_steps_per_epoch=2, mixup=0.8, cutmix=1.0, num_workers=0, device="cpu",
        progress=False, tensorboard=False,
    )
    seed_everything(cfg.seed)
    initial, _ = build_models(cfg, {})  # the same start as train() builds
    result = train(cfg, train_set=TensorDataset(x, y), val_set=TensorDataset(x[:10], y[:10]))
    sums = lambda m: {k: float(v.double().sum()) for k, v in m.state_dict().items()}
    rank = int(os.environ["RANK"])
    record = dict(rank=rank, world=int(os.environ["WORLD_SIZE"]), before=sums(initial), after=sums(result.model),
                  history=result.history)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    """
)


@pytest.mark.slow
def test_two_processes_stay_in_sync(tmp_path):
    torch.manual_seed(0)
    teacher = dynamicvit.save_model(create_backbone("vit_tiny_patch16_224", **MICRO), tmp_path / "teacher.safetensors")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(teacher), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    r0, r1 = ranks
    # Identical weights on both ranks after training ...
    assert r0["after"].keys() == r1["after"].keys()
    for k in r0["after"]:
        assert r0["after"][k] == r1["after"][k], f"{k} differs between ranks"
    # ... that moved: predictors in both epochs, the backbone once unfrozen; the class token never.
    changed = {k for k in r0["after"] if r0["after"][k] != r0["before"][k]}
    assert any(k.startswith("predictors.") for k in changed)
    assert "backbone.blocks.0.attn.qkv.weight" in changed
    assert "backbone.cls_token" not in changed and "backbone.pos_embed" not in changed
    # The epoch metrics are averaged over ranks, so both report the same numbers; rank 0 alone wrote files.
    assert r0["history"] == [{**row, "epoch_time_s": r0["history"][i]["epoch_time_s"]} for i, row in enumerate(r1["history"])]
    assert r0["history"][-1]["val_images"] == 10  # each rank evaluated its shard; the counts were summed
    assert (out / "last.pth").is_file() and (out / "model.safetensors").is_file()
    assert dynamicvit.load_model(out / "model.safetensors").num_classes == 4
