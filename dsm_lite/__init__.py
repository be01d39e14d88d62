"""dsm_lite: token merging (ToMe, spatial merging, DSM) for timm Vision Transformers."""

__version__ = "0.1.0"
