import pytest
import torch

from visionmoe.eval import extract_features
from visionmoe.models import create_model


def test_features_are_unit_norm_mean_of_patch_tokens():
    m = create_model("vit_nano_patch4_32", num_classes=0)
    x = torch.randn(5, 1, 16, 16)  # adapted to the model's 3 x 32 x 32
    f = extract_features(m, x, batch_size=2)
    assert f.shape == (5, 96)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(5))
    xa = torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear",
                                         align_corners=False)
    with torch.no_grad():
        ref = m.eval().forward_features(xa)[:, 1:].mean(1)
    torch.testing.assert_close(f, torch.nn.functional.normalize(ref, dim=-1), rtol=1e-4, atol=1e-5)
    cls = extract_features(m, x, pool="cls", normalize=False)
    torch.testing.assert_close(cls, m.forward_features(xa)[:, 0].detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        extract_features(m, x, pool="max")
