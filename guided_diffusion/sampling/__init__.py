"""Sampling: the sample stage, its modes (noise, variation, inpaint, harmonize, paste) and the choice of masks."""
