"""Semantic Diffusion Model (SDM) engine: mask-conditioned image synthesis to grow segmentation datasets."""
