"""Class score maps -> label masks: post-process, dense CRF, PNG codec, per-image statistics."""
