"""elucd-fast: off-the-shelf classifier guidance for diffusion models (EluCD)."""
__version__ = "0.1.0"
