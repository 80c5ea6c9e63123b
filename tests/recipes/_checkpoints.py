"""Shared check: every checkpoint a recipe writes rebuilds, with no extra argument, the model it holds."""

import torch
from PIL import Image

from visionmoe.cli.main import main
from visionmoe.train import load_checkpoint, load_trained_model


def every_checkpoint_loads(root, *, at_least: int, predict=lambda ck, model: False) -> list:
    """``load_trained_model`` and ``visionmoe info`` take each ``step_*.safetensors`` under
    ``root`` and give back exactly its weights; ``visionmoe predict`` runs on the ones
    ``predict(path, model)`` selects. Returns the (path, model, state) triples."""
    ckpts = sorted(root.rglob("step_*.safetensors"))
    assert len(ckpts) >= at_least, ckpts
    out = []
    for ck in ckpts:
        model, _, st = load_trained_model(ck)
        sd = load_checkpoint(ck)["model"]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items()), ck
        assert main(["info", str(ck)]) == 0, ck
        if predict(ck, model):
            img = root / f"probe_{st.img_size}.png"
            Image.fromarray((torch.rand(st.img_size, st.img_size) * 255).byte().numpy(), mode="L").save(img)
            assert main(["predict", str(ck), str(img), "--json"]) == 0, ck
        out.append((ck, model, st))
    return out
