"""``wsss predict``: a trained segmenter over a dataset split with Ray Data, masks written, scored."""
