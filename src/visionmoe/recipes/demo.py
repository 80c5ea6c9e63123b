"""The V-MoE demo (``visionmoe demo --vmoe``): a small V-MoE classifier trained on real
bundled digits in about a minute, with its routing statistics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..analysis import class_expert_table
from ..data import load_digits
from ..models import count_parameters, create_model
from ..train import evaluate, train_classifier

__all__ = ["run_demo"]


def run_demo(*, quick: bool = False, seed: int = 0, out: str | Path = "runs/demo", progress: bool = True) -> dict:
    """Train ``vmoe_nano`` (4 experts, top-1, every other block) on scikit-learn's real 8x8 digits
    (2x2 patches: 16 tokens + CLS), report test accuracy and routing statistics."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    data = load_digits(seed=seed)
    console.print(f"[bold]visionmoe demo[/] — {data}")
    img = 8
    torch.manual_seed(seed)
    model = create_model(
        "vmoe_nano_patch4_32", img_size=img, patch_size=2, in_chans=1, num_classes=data.num_classes,
        num_experts=4, top_k=1, noise_std=1.0,
    )
    params = count_parameters(model)
    console.print(f"model vmoe_nano: {params['total'] / 1e6:.2f}M parameters, {params['active'] / 1e6:.2f}M active "
                  f"per token, MoE blocks {model.moe_blocks}")
    epochs = 8 if quick else 40
    hist = train_classifier(model, data.x_train, data.y_train, epochs=epochs, batch_size=64, lr=2e-3,
                            warmup_epochs=1, img_size=img, seed=seed, progress=progress)
    xt = torch.nn.functional.interpolate(data.x_test, size=(img, img), mode="bilinear", align_corners=False)
    acc = evaluate(model, xt, data.y_test)
    model.eval()
    model(xt)
    stats = model.routing_stats()
    table = class_expert_table(model, xt, data.y_test, data.num_classes)

    console.print(f"\n[bold green]test accuracy {acc:.2%}[/] on {len(xt)} held-out digits "
                  f"(chance 10%), {hist['images_per_second']:.0f} train img/s, {hist['train_seconds']:.0f} s")
    t = Table(title="routing on the test set (eval, dropless)")
    for col in ("layer", "load per expert", "max load", "gate entropy", "dropped"):
        t.add_column(col)
    for name, s in stats.items():
        t.add_row(name, " ".join(f"{v:.2f}" for v in s["load"]), f"{s['max_load']:.2f}",
                  f"{s['gate_entropy']:.3f}", f"{s['dropped_fraction']:.1%}")
    console.print(t)
    last = max(table)
    ct = Table(title=f"class -> expert share of tokens, block {last}")
    ct.add_column("class")
    for e in range(table[last].shape[1]):
        ct.add_column(f"e{e}")
    for c, row in enumerate(table[last].tolist()):
        ct.add_row(data.classes[c], *[f"{v:.2f}" for v in row])
    console.print(ct)

    result = {"dataset": data.name, "test_accuracy": acc, "epochs": epochs, "params": params,
              "train_seconds": hist["train_seconds"], "images_per_second": hist["images_per_second"],
              "routing": stats, "class_expert": {str(b): t.tolist() for b, t in table.items()},
              "final_loss": hist["loss"][-1]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    console.print(f"results written to {out / 'demo.json'}")
    return result
