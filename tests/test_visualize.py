"""Pictures of kept tokens: the masks are the ones the model used, the pixels show exactly those, bad inputs are skipped."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import dynamicvit
from dynamicvit import visualize as vis
from dynamicvit.cli import main as cli_main
from dynamicvit.data import eval_transform, preprocessing_config
from dynamicvit.errors import ConfigError, DataError

from conftest import TINY, tiny_model

VARIANTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4)),
    "gray28_patch4": ("vit_tiny_patch16_224", dict(img_size=28, in_chans=1)),  # Fashion-MNIST: 7x7 grid
    "nonsquare": ("vit_tiny_patch16_224", dict(img_size=(32, 48), patch_size=8)),  # 4x6 grid
}
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _images(model, batch=3, seed=1):
    torch.manual_seed(seed)
    C = model.backbone.patch_embed.proj.in_channels
    h, w = model.backbone.patch_embed.img_size
    return torch.randn(batch, C, h, w)


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request):
    name, kw = VARIANTS[request.param]
    return tiny_model(name, **kw).eval()


def _recompute(model, x):
    """The kept patches re-derived stage by stage from the blocks and predictors, with a full sort."""
    m, P, N = model.backbone, model.num_prefix_tokens, model.num_patches
    t = m.norm_pre(m._pos_embed(m.patch_embed(x)))
    index = torch.arange(N).expand(x.shape[0], N)
    kept, first_prob = [], None
    stage = 0
    for i, blk in enumerate(m.blocks):
        if stage < len(model.prune_locs) and i == model.prune_locs[stage]:
            log_p = model.predictors[stage](t[:, P:])[..., 0]  # (B, n)
            first_prob = log_p.exp() if first_prob is None else first_prob
            order = log_p.argsort(dim=1, descending=True)[:, : model.keep_counts()[stage]]
            patches = t[:, P:].gather(1, order[..., None].expand(-1, -1, t.shape[-1]))
            t = torch.cat([t[:, :P], patches], dim=1)
            index = index.gather(1, order)
            kept.append(index)
            stage += 1
        t = blk(t)
    return kept, first_prob


def test_masks_are_the_tokens_the_model_kept(variant):
    x = _images(variant)
    tm = vis.kept_token_masks(variant, x, batch_size=2)  # two forward passes, joined
    B, (gh, gw) = x.shape[0], variant.grid_size
    assert tm.masks.shape == (B, 3, gh, gw) and tm.masks.dtype == bool
    assert tm.keep_prob.shape == (B, gh, gw)
    with torch.no_grad():
        kept, first_prob = _recompute(variant, x)
    for s, k in enumerate(variant.keep_counts()):
        flat = tm.masks[:, s].reshape(B, -1)
        assert (flat.sum(1) == k).all()
        if s:
            assert not (flat & ~tm.masks[:, s - 1].reshape(B, -1)).any(), "stage s+1 must be a subset of stage s"
        for b in range(B):
            assert set(np.flatnonzero(flat[b])) == set(kept[s][b].tolist()) == set(tm.kept_indices[s][b].tolist())
    np.testing.assert_allclose(tm.keep_prob.reshape(B, -1), first_prob.numpy(), rtol=1e-5, atol=1e-6)
    # Stage probabilities exist exactly where the patch reached that stage.
    reached = np.concatenate([np.ones_like(tm.masks[:, :1]), tm.masks[:, :-1]], axis=1)
    assert (np.isnan(tm.stage_keep_prob) == ~reached).all()


def test_masks_reproduce_the_logits_through_the_training_path(variant):
    x = _images(variant)
    tm = vis.kept_token_masks(variant, x)
    decisions = [torch.from_numpy(tm.masks[:, s].reshape(len(x), -1)).float() for s in range(tm.num_stages)]
    with torch.no_grad():
        out = variant.forward_masked(x, decisions=decisions)
    torch.testing.assert_close(out.logits, torch.from_numpy(tm.logits), atol=1e-4, rtol=1e-4)


def test_model_mode_is_restored_and_dense_models_are_refused():
    model = tiny_model().train()
    vis.kept_token_masks(model, _images(model, 1))
    assert model.training
    with pytest.raises(ConfigError, match="sparsify"):
        vis.kept_token_masks(model.backbone, _images(model, 1))


def test_contact_sheet_png_shows_exactly_the_dropped_patches(tmp_path, variant):
    x = _images(variant)
    C = x.shape[1]
    path = vis.save_contact_sheet(variant, x, tmp_path / "sheet.png", mean=MEAN[:C], std=STD[:C], titles=["a", "b", "c"])
    png = np.asarray(Image.open(path).convert("RGB"))
    tm = vis.kept_token_masks(variant, x)
    grid = vis.render_contact_sheet(vis.to_uint8(x, MEAN, STD), tm, ["a", "b", "c"])

    h, w = variant.backbone.patch_embed.img_size
    scale = grid.scale
    assert scale == -(-112 // min(h, w)) and min(h, w) * scale >= 112  # small inputs enlarged to >= 112 px
    lay = vis.Layout.for_panel((h * scale, w * scale))
    m, line, cols = lay.margin, lay.line, 1 + tm.num_stages + 1
    assert png.shape == (m + line + 3 * (line + h * scale + m) + line + m, cols * w * scale + (cols + 1) * m, 3)
    assert (png == np.asarray(grid.image)).all()

    ph, pw = (p * scale for p in variant.backbone.patch_embed.patch_size)
    gh, gw = variant.grid_size
    pixels = vis.to_uint8(x, MEAN, STD)
    for r in range(len(x)):
        crop = lambda c: png[grid.boxes[r][c][1] : grid.boxes[r][c][3], grid.boxes[r][c][0] : grid.boxes[r][c][2]]
        original = crop(0)
        assert (original == np.repeat(np.repeat(pixels[r], scale, 0), scale, 1)).all()
        color = np.array(vis.FADE_COLOR_GRAY if C == 1 else vis.FADE_COLOR)
        for s in range(tm.num_stages):
            panel = crop(1 + s)
            for i in range(gh):
                for j in range(gw):
                    a = original[i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].astype(int)
                    b = panel[i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].astype(int)
                    if tm.masks[r, s, i, j]:
                        assert (a == b).all(), f"kept patch ({i}, {j}) of stage {s + 1} changed"
                    else:
                        expected = np.round(a * (1 - vis.FADE_STRENGTH) + color * vis.FADE_STRENGTH)
                        assert (a != b).any() and (np.abs(b - expected) <= 1).all(), f"dropped patch ({i}, {j}) not faded"


def test_heatmap_panel_follows_the_first_stage_probability(tmp_path):
    model = tiny_model().eval()
    x = _images(model, 2)
    tm = vis.kept_token_masks(model, x)
    tm.keep_prob[0] = np.linspace(0, 1, 64).reshape(8, 8)  # a known map
    grid = vis.render_tokens(vis.to_uint8(x, MEAN, STD)[0], tm, 0, title="t")
    heat = grid.panel(0, 1 + tm.num_stages)
    block = 4 * grid.scale
    cells = heat[block // 2 :: block, block // 2 :: block]  # one pixel per patch
    lut = vis._colormap(vis.CMAP)
    expected = lut[np.round(np.linspace(0, 1, 64) * 255).astype(int)].reshape(8, 8, 3)
    assert (cells == expected).all()


def test_gray_28px_panels_are_enlarged_to_readable_size():
    model = tiny_model(img_size=28, in_chans=1).eval()
    x = _images(model, 1)
    tm = vis.kept_token_masks(model, x)
    assert tm.grid_size == (7, 7)
    img = vis.to_uint8(x, (0.5,), (0.5,))[0]
    assert img.shape == (28, 28, 3) and (img[..., 0] == img[..., 2]).all()
    grid = vis.render_tokens(img, tm)
    assert grid.scale == 4
    left, top, right, bottom = grid.boxes[0][0]
    assert (right - left, bottom - top) == (112, 112)


def test_to_uint8_inverts_the_normalization():
    pixels = torch.randint(0, 256, (2, 3, 5, 6), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = (pixels.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert (vis.to_uint8(x, mean, std) == pixels.permute(0, 2, 3, 1).numpy()).all()
    with pytest.raises(ConfigError, match="channels"):
        vis.to_uint8(x, (0.1, 0.2), std)


def test_average_maps_are_mean_masks_and_sum_to_keep_counts():
    model = tiny_model(reg_tokens=4).eval()
    x = _images(model, 5)
    maps = vis.average_keep_maps(model, [(x[:3], torch.zeros(3)), (x[3:], torch.zeros(2))])
    tm = vis.kept_token_masks(model, x)
    np.testing.assert_allclose(maps, tm.masks.mean(0))
    np.testing.assert_allclose(maps.reshape(3, -1).sum(1), model.keep_counts())
    prob = vis.average_keep_maps(model, [x], kind="prob")
    np.testing.assert_allclose(prob[0], tm.keep_prob.mean(0), rtol=1e-6)
    never = ~tm.masks[:, 1].any(0)  # patches that no image carried into stage 3
    assert (np.isnan(prob[2]) == never).all()
    with pytest.raises(DataError):
        vis.average_keep_maps(model, [])


def test_unreadable_files_give_a_clear_error(tmp_path):
    transform = eval_transform(preprocessing_config(tiny_model()))
    (tmp_path / "notes.txt").write_text("not an image")
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 40), (10, 200, 30)).save(good)
    (tmp_path / "broken.png").write_bytes(good.read_bytes()[:60])
    assert vis.load_image(good, transform, 3).shape == (3, 32, 32)
    for name, reason in [("notes.txt", "not an image"), ("broken.png", "corrupt or truncated"), ("missing.jpg", "no such file")]:
        with pytest.raises(DataError, match=reason) as e:
            vis.load_image(tmp_path / name, transform, 3)
        assert name in str(e.value)


def test_eval_transform_uses_the_model_size_and_channels():
    cfg = preprocessing_config(tiny_model(img_size=28, in_chans=1))
    transform = eval_transform(cfg)
    assert cfg["input_size"] == [1, 28, 28] and len(cfg["mean"]) == len(cfg["std"]) == 1
    x = transform(Image.new("RGB", (300, 200), (255, 0, 0)).convert("L"))
    assert x.shape == (1, 28, 28)


def test_html_links_or_embeds_the_pictures(tmp_path):
    png = tmp_path / "pics" / "a.png"
    png.parent.mkdir()
    Image.new("RGB", (4, 4)).save(png)
    page = vis.write_html(tmp_path / "index.html", [("a <1>", png)])
    text = page.read_text()
    assert 'src="pics/a.png"' in text and "a &lt;1&gt;" in text
    assert "data:image/png;base64," in vis.write_html(tmp_path / "e.html", [("a", png)], embed=True).read_text()


# -- command line -------------------------------------------------------------------------------


def _model_kwargs():
    return ["--model-kwargs", ",".join(f"{k}={v}" for k, v in TINY.items())]


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(folder / "cat.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / "sub" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / "sub" / "alpha.webp")
    (folder / "labels.csv").write_text("cat,0\n")
    (folder / "broken.jpg").write_bytes((folder / "cat.jpg").read_bytes()[:100])
    return folder


def test_cli_draws_every_readable_image_and_skips_the_rest(tmp_path, image_folder, caplog):
    ckpt = dynamicvit.save_model(tiny_model(), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rc = cli_main(["visualize", "--checkpoint", str(ckpt), "--output", str(out), str(image_folder),
                       str(tmp_path / "nope.png"), "--contact-sheet", "--html"])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["alpha.png", "cat.png", "contact_sheet.png", "gray.png"]
    warnings = caplog.text
    for name in ("labels.csv", "broken.jpg", "nope.png"):
        assert name in warnings
    assert "random weights" not in warnings  # the checkpoint has trained (saved) predictors
    width, height = Image.open(out / "cat.png").size
    assert width == 5 * 128 + 6 * vis.Layout.for_panel((128, 128)).margin
    assert Image.open(out / "contact_sheet.png").size[1] > 3 * 128
    html = (out / "index.html").read_text()
    assert all(f'src="{n}"' in html for n in ("cat.png", "gray.png", "alpha.png", "contact_sheet.png"))


def test_cli_fails_only_when_nothing_could_be_drawn(tmp_path, image_folder, capsys):
    args = ["visualize", "--model", "vit_tiny_patch16_224", *_model_kwargs(), "--output", str(tmp_path / "out")]
    rc = cli_main(args + [str(image_folder / "labels.csv"), str(image_folder / "broken.jpg")])
    assert rc == 2 and "nothing could be drawn" in capsys.readouterr().err
    assert cli_main(args + [str(image_folder / "cat.jpg"), str(image_folder / "labels.csv")]) == 0


def test_model_kwargs_accept_pairs_and_json():
    from argparse import ArgumentTypeError

    from dynamicvit.commands._common import model_kwargs as parse_model_kwargs

    assert parse_model_kwargs("in_chans=1, img_size=(32, 48),global_pool=avg,class_token=false") == dict(
        in_chans=1, img_size=(32, 48), global_pool="avg", class_token=False
    )
    assert parse_model_kwargs('{"patch_size": 4, "img_size": [32, 48]}') == dict(patch_size=4, img_size=[32, 48])
    assert parse_model_kwargs("") == {}
    with pytest.raises(ArgumentTypeError, match="KEY=VALUE"):
        parse_model_kwargs("in_chans")


def test_cli_mean_and_std_do_not_swallow_the_images(tmp_path, image_folder, monkeypatch):
    seen = []
    original = vis.kept_token_masks
    monkeypatch.setattr(vis, "kept_token_masks", lambda model, x, **kw: seen.append(x) or original(model, x, **kw))
    Image.new("RGB", (32, 32), (255, 0, 51)).save(tmp_path / "red.png")
    rc = cli_main(["visualize", "--model", "vit_tiny_patch16_224", *_model_kwargs(), "--output", str(tmp_path / "o"),
                   "--crop-pct", "1", "--mean", "0.5,0,0.2", "--std", "0.25", str(tmp_path / "red.png")])
    assert rc == 0
    torch.testing.assert_close(seen[0][0, :, 0, 0], torch.tensor([2.0, 0.0, 0.0]))  # (1 - .5)/.25, 0, (.2 - .2)/.25


def test_cli_warns_about_random_predictors_and_loads_plain_checkpoints(tmp_path, image_folder, caplog):
    model = tiny_model()
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pth")

    def args(out, *extra):
        return ["visualize", "--model", "vit_tiny_patch16_224", "--output", str(tmp_path / out), *extra,
                *_model_kwargs(), str(image_folder / "cat.jpg")]

    with caplog.at_level(logging.WARNING):
        assert cli_main(args("a")) == 0
    assert "random weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli_main(args("b", "--checkpoint", str(tmp_path / "plain.pth"))) == 0
    assert "random weights" not in caplog.text
    assert (tmp_path / "b" / "cat.png").exists()
    # A dense model saved by dynamicvit: drawn with fresh predictors, and a warning.
    dense = dynamicvit.save_model(model.backbone, tmp_path / "dense.safetensors")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli_main(["visualize", "--checkpoint", str(dense), "--output", str(tmp_path / "c"), str(image_folder)]) == 0
    assert "random weights" in caplog.text


def test_cli_splits_many_images_into_several_contact_sheets(tmp_path, image_folder):
    ckpt = dynamicvit.save_model(tiny_model(), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    assert cli_main(["visualize", "--checkpoint", str(ckpt), "--output", str(out), "--contact-sheet", "--sheet-rows", "2",
                     "--batch-size", "2", str(image_folder)]) == 0
    sheets = sorted(p.name for p in out.glob("contact_sheet*.png"))
    assert sheets == ["contact_sheet_01.png", "contact_sheet_02.png"]  # 3 readable images, 2 per sheet
    assert Image.open(out / sheets[0]).size[1] > Image.open(out / sheets[1]).size[1]


def test_cli_average_mode(tmp_path, image_folder):
    ckpt = dynamicvit.save_model(tiny_model(keep_ratio=0.5), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    rc = cli_main(["visualize", "--checkpoint", str(ckpt), "--output", str(out), "--average", "--keep-ratio", "0.7",
                   str(image_folder)])
    assert rc == 0
    maps = np.load(out / "average_keep.npy")
    assert maps.shape == (3, 8, 8)
    np.testing.assert_allclose(maps.reshape(3, -1).sum(1), [44, 31, 21])  # keep ratio overridden to 0.7
    assert (out / "average_keep.png").exists() and not (out / "cat.png").exists()


def _write_idx(folder, prefix, images, labels):
    """Fashion-MNIST's IDX format: big-endian magic number and sizes, then the uint8 data."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(np.array([2051, n, h, w], ">i4").tobytes() + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], ">i4").tobytes() + labels.tobytes())


@pytest.fixture
def gray_checkpoint(tmp_path):
    """A 28 px grayscale DynamicViT saved as `dynamicvit train` saves one trained on Fashion-MNIST."""
    model = tiny_model(img_size=28, in_chans=1)
    extra = {"train_config": {"dataset": "fashion-mnist"}}
    return dynamicvit.save_model(model, tmp_path / "fmnist.safetensors", extra=extra)


def _original_panel(png_path):
    grid_png = np.asarray(Image.open(png_path).convert("RGB"))
    lay = vis.Layout.for_panel((112, 112))
    top = lay.margin + 2 * lay.line  # heading line, then column titles
    return grid_png[top : top + 112, lay.margin : lay.margin + 112]


def test_cli_dataset_samples_are_drawn_with_their_labels(tmp_path, gray_checkpoint, monkeypatch):
    monkeypatch.setenv("DYNAMICVIT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.arange(6, dtype=np.uint8)
    _write_idx(tmp_path / "fm", "t10k", images, labels)
    _write_idx(tmp_path / "fm", "train", images, labels)
    out = tmp_path / "out"
    rc = cli_main(["visualize", "--checkpoint", str(gray_checkpoint), "--output", str(out), "--dataset", "fashion-mnist",
                   "--data-dir", str(tmp_path / "fm"), "--num-samples", "3", "--contact-sheet", "--html"])
    assert rc == 0
    pngs = sorted(out.glob("fashion-mnist_val_*.png"))
    assert len(pngs) == 3 and (out / "contact_sheet.png").exists()
    html = (out / "index.html").read_text()
    for png in pngs:
        idx = int(png.stem.rsplit("_", 1)[1])
        label = dynamicvit.data.FASHION_MNIST_CLASSES[labels[idx]]
        assert f"true {html_escape(label)}" in html
        # No crop, exact normalization round trip: the original panel is the dataset image, enlarged 4x.
        assert (_original_panel(png)[..., 0] == np.repeat(np.repeat(images[idx], 4, 0), 4, 1)).all()


def test_cli_image_files_use_the_checkpoints_training_normalization(tmp_path, gray_checkpoint, monkeypatch):
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "shirt.png")
    seen = []
    original = vis.kept_token_masks
    monkeypatch.setattr(vis, "kept_token_masks", lambda model, x, **kw: seen.append(x) or original(model, x, **kw))
    out = tmp_path / "out"
    assert cli_main(["visualize", "--checkpoint", str(gray_checkpoint), "--output", str(out), str(tmp_path / "shirt.png")]) == 0
    info = dynamicvit.data.FASHION_MNIST
    expected = (torch.from_numpy(pixels).float() / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(seen[0][0, 0], expected)  # the model saw Fashion-MNIST's normalization, uncropped
    assert (_original_panel(out / "shirt.png")[..., 0] == np.repeat(np.repeat(pixels, 4, 0), 4, 1)).all()


def html_escape(text):
    import html

    return html.escape(text)
