"""Stable Diffusion side: models, attention capture, prompts, the segmenter and its methods. Knows nothing of files, jobs or Ray."""
