"""tspace_core: diffusion math, models, data, checkpoints and the `tspace` CLI."""

__version__ = "0.1.0"
