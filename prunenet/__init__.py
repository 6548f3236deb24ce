"""PruneNet: calibration-free structured pruning of LLM FFN layers with policy learning.

Implements "You Only Prune Once: Designing Calibration-Free Model Compression
With Policy Learning" (ICLR 2025, arXiv 2501.15296).
"""

__version__ = "0.1.0"
