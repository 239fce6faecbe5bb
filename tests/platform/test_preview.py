"""The labeling preview's regions cell: every region's edge drawn, nothing else touched."""

import numpy as np

from wsss_platform.preview import outline


def test_outline_draws_the_edges_of_every_layer_s_regions():
    image = np.zeros((4, 6, 3), np.uint8)
    layers = np.array([[[0, 0, 0, 1, 1, 1]] * 4,  # a left and a right half
                       [[-1] * 6, [-1] * 6, [2] * 6, [2] * 6]])  # an overlapping bottom half (SAM's overlaps)
    out = outline(image, layers)
    edge = np.zeros((4, 6), bool)
    edge[:, 3] = True  # where the halves meet
    edge[2, :] = True  # where the bottom region starts
    assert np.array_equal(out.any(-1), edge) and (out[edge] == 255).all()
