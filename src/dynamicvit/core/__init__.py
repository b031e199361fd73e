"""The method: settings (`settings`), the math (`ops`), host families (`hosts`), state-dict layouts
(`layouts`), the sparse-model base (`base`) and its two kinds, `DynamicViT` (`vit`) for token hosts and
`DynamicSpatial` (`spatial`) for ConvNeXt and Swin, and the training objectives (`losses`).

Nothing here reads files, times models or knows about datasets: those layers sit above.
"""
