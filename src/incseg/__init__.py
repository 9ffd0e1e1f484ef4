"""incseg: class-incremental semantic segmentation (MiB, Cermelli et al., CVPR 2020, and baselines)."""

__version__ = "0.1.0"
