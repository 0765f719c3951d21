"""DDSC: gene-ID-conditioned DiT masked discrete diffusion for single-cell expression."""

__version__ = "0.1.0"
