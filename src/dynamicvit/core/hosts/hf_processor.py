"""Image-processor settings of transformers models (preprocessor_config.json) as `data.eval_config`
descriptions, and the settings of each family's official releases for models that come without one.

Pure dictionary arithmetic: nothing here reads a file or imports transformers.
"""
from __future__ import annotations

# The image processors of each family's official releases (preprocessor_config.json), used when a model
# comes without one: ViT squashes to the input size with mean/std 0.5; DeiT squashes to 256 and crops
# 224; DINOv2 and CLIP resize the shorter side and crop the center.
_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
DEFAULT_PROCESSORS: dict[str, dict] = {
    "vit": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "resize_mode": "squash"},
    "deit": {**_IMAGENET, "resample": 3, "resize_mode": "squash", "do_center_crop": True, "crop_pct": 224 / 256},
    "dinov2": {**_IMAGENET, "resample": 3, "resize_mode": "center", "do_center_crop": True, "crop_pct": 224 / 256},
    "clip_vision_model": {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                          "resample": 3, "resize_mode": "center", "do_center_crop": True},
}
DEFAULT_PROCESSORS["dinov2_with_registers"] = DEFAULT_PROCESSORS["dinov2"]
# PIL resampling codes of preprocessor_config.json -> timm's interpolation names.
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def processor_preprocessing(processor: dict, model_type: str, input_size: tuple[int, int, int]) -> dict:
    """An image processor's settings (preprocessor_config.json) as a `data.eval_config`, at `input_size`.

    Resizing: `size` {"height", "width"} squashes the image to that size (crop_mode "squash"),
    {"shortest_edge"} resizes the shorter side (crop_mode "center"); a center crop gives crop_pct =
    crop / resize. A legacy integer `size` is a square for ViT and DeiT, the shorter side otherwise.
    Normalization: (x * rescale_factor - mean) / std on raw pixels x (rescale_factor usually 1/255), expressed
    on pixels scaled to [0, 1] as ToTensor gives them.
    """
    C, H, W = (int(v) for v in input_size)
    size = processor.get("size")
    if isinstance(size, (int, float)):
        size = {"height": size, "width": size} if model_type in ("vit", "deit") else {"shortest_edge": size}
    size = size or {}
    crop = processor.get("crop_size")
    crop = {"height": crop, "width": crop} if isinstance(crop, (int, float)) else (crop or {})
    crop_h = crop.get("height") or H
    if "shortest_edge" in size:
        mode, resized = "center", size["shortest_edge"]
    elif "height" in size:
        mode, resized = "squash", size["height"]
    else:  # no size: the family's default (`DEFAULT_PROCESSORS`) at the model's input size
        mode, resized = processor.get("resize_mode", "squash"), None
    if not processor.get("do_center_crop", False):
        crop_pct = 1.0
    elif resized:
        crop_pct = float(crop_h) / float(resized)
    else:
        crop_pct = float(processor.get("crop_pct", 1.0))
    # ToTensor gives x / 255; the processor computes (x * rescale_factor - mean) / std.
    scale = 255.0 * (processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) else 1.0)
    mean = processor.get("image_mean", [0.0] * C) if processor.get("do_normalize", True) else [0.0] * C
    std = processor.get("image_std", [1.0] * C) if processor.get("do_normalize", True) else [1.0] * C
    mean, std = _per_channel(mean, C), _per_channel(std, C)
    return {
        "input_size": [C, H, W],
        "mean": [m / scale for m in mean],
        "std": [s / scale for s in std],
        "crop_pct": min(max(crop_pct, 1e-3), 1.0),
        "crop_mode": mode,
        "interpolation": RESAMPLE.get(processor.get("resample", 3), "bicubic"),
    }


def _per_channel(values, channels: int) -> list[float]:
    v = [float(x) for x in (values if isinstance(values, (list, tuple)) else [values])]
    return v * channels if len(v) == 1 else v
