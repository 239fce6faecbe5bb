import builtins

import numpy as np
import pytest
import torch

from wsss_core.pipeline import PseudoMasker
from wsss_core.refine import CAA, DenseCRF
from wsss_core.refine import crf as crf_module
from wsss_core.types import CamOutput


def test_dense_crf_posteriors():
    pytest.importorskip("pydensecrf.densecrf")
    img = np.zeros((20, 24, 3), np.uint8)
    img[:, 12:] = 255
    fg = torch.full((20, 24), 0.4)
    fg[:, 12:] = 0.6  # weak evidence for class 1 on the bright half...
    fg[8:11, 16:19] = 0.45  # ...with a noisy patch that the bilateral term should absorb
    probs = torch.stack([1 - fg, fg])
    assert (probs.argmax(0)[8:11, 16:19] == 0).all()
    q = crf_module.dense_crf(img, probs, iterations=10)
    assert q.shape == (2, 20, 24)
    torch.testing.assert_close(q.sum(0), torch.ones(20, 24), atol=1e-4, rtol=0)
    assert (q.argmax(0)[:, 12:] == 1).all() and (q.argmax(0)[:, :12] == 0).all()


def test_crf_in_refinement_gives_masks():
    pytest.importorskip("pydensecrf.densecrf")
    cams = torch.rand(2, 3, 4)
    masker = PseudoMasker([CAA(), DenseCRF()], mu=0.5)
    res = masker([CamOutput([4, 9], cams, torch.rand(2), {"attn/8": torch.rand(12, 12)})], [(24, 32)],
                 [np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)])[0]
    assert res.mask.shape == (24, 32) and set(res.mask.unique().tolist()) <= {0, 4, 9}
    assert res.scores.shape == (2, 24, 32)


def test_missing_crf_package_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError("No module named 'pydensecrf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(crf_module.CRFUnavailableError, match=r"pip install 'wsss-platform\[crf\]'"):
        crf_module.dense_crf(np.zeros((4, 4, 3), np.uint8), torch.rand(2, 4, 4))
