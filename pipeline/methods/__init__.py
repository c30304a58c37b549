"""Pure tensor functions of the peer methods (DiffSeg, GoCA, DiffSegmenter): no models, files or Ray."""
