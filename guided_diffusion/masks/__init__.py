"""The mask generator: a diffusion model over masks that draws new layouts (model, training, quality report)."""
