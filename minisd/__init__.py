"""minisd: Stable Diffusion and BK-SDM (block-removed, knowledge-distilled SD) in plain PyTorch."""

__all__ = ["Pipeline", "load_pipeline"]


def __getattr__(name: str):
    # Imported on first use, so that `python -m minisd.unet` (and the other module CLIs) do not
    # load their own module twice through the package.
    if name in __all__:
        from minisd import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'minisd' has no attribute {name!r}")
