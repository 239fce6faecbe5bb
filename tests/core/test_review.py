import numpy as np
import pytest

from wsss_core.review import changed_share, doubt


def test_doubt_terms_on_hand_counted_pixels():
    mask = np.array([[0, 0, 1, 1], [0, 2, 2, 1]])
    conf = np.array([[1.0, 0.9, 0.5, 0.7], [0.96, 0.8, 1.0, 0.6]])
    other = np.array([[0, 1, 1, 1], [0, 2, 0, 0]])
    d = doubt(mask, conf, mu=0.95, other=other)
    assert d.low == pytest.approx(5 / 8)  # 0.9, 0.5, 0.7, 0.8, 0.6
    assert d.fg_conf == pytest.approx((0.5 + 0.7 + 0.8 + 1.0 + 0.6) / 5)
    assert d.disagree == pytest.approx(3 / 8)
    assert d.doubt == pytest.approx((5 / 8 + 1 - 0.72 + 3 / 8) / 3)
    alone = doubt(mask, conf, mu=0.95)
    assert alone.disagree is None and alone.doubt == pytest.approx((5 / 8 + 1 - 0.72) / 2)


def test_no_foreground_is_no_foreground_doubt_and_sizes_must_match():
    bg = np.zeros((3, 3), dtype=int)
    assert doubt(bg, np.ones((3, 3)), 0.95).doubt == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        doubt(bg, np.ones((3, 4)), 0.95)
    assert changed_share(bg, np.eye(3, dtype=int)) == pytest.approx(3 / 9)
