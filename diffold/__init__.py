"""diffold: training suite for sequence -> 3D structure diffusion models (RNA and protein)."""
__version__ = "0.1.0"
