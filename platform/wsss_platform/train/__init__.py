"""Training on Ray Train (V2): recipes on one base (config / data / loop / job). The segmenter with
CLIP-ES's confidence-guided loss is the first recipe."""
