import dataclasses
from pathlib import Path

import pytest
import yaml

from visionmoe.train import ConfigError, apply_overrides, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2] / "configs"
VARIANTS = sorted(ROOT.rglob("routing_methods*.yaml"))  # sweep variants files, not experiments
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p.parent.name != "moce" and p not in VARIANTS)
MOCE_CONFIGS = sorted((ROOT / "moce").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_file_validates(path):
    cfg = load_config(path)
    from visionmoe.models import list_models

    assert cfg.model.name in list_models()


@pytest.mark.parametrize("path", MOCE_CONFIGS, ids=lambda p: p.name)
def test_every_moce_demo_config_validates(path):
    from visionmoe.recipes.moce_demo import MoCEDemoConfig

    cfg = MoCEDemoConfig.from_yaml(path)
    assert cfg.num_experts >= 1 and cfg.task_names
    if path.name == "demo.yaml":  # the documented defaults are the real defaults, every one of them
        assert cfg == MoCEDemoConfig()
        listed = yaml.safe_load(path.read_text())
        assert [f.name for f in dataclasses.fields(MoCEDemoConfig) if f.name not in listed] == []


def test_moce_demo_config_errors():
    from visionmoe.recipes.moce_demo import MoCEDemoConfig

    with pytest.raises(ConfigError, match=r"'num_expert'.*Did you mean 'num_experts'"):
        MoCEDemoConfig.from_yaml(None, ["num_expert=8"])
    with pytest.raises(ConfigError, match="finetune_lrs"):
        MoCEDemoConfig.from_yaml(None, ["finetune_lrs=[]"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        MoCEDemoConfig.from_yaml(ROOT / "../README.md")  # markdown is not a YAML mapping
    cfg = MoCEDemoConfig.from_yaml(None, ["num_experts=8", "blocks=[0, 1]"], quick=True)
    assert cfg.num_experts == 8 and cfg.blocks == [0, 1] and cfg.seeds == [0]


def test_unknown_keys_name_the_path_and_suggest():
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*Did you mean 'lr'"):
        config_from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"'moe.topk'.*Did you mean 'top_k'"):
        config_from_dict({"moe": {"topk": 2}})
    with pytest.raises(ConfigError, match=r"'dataa'.*Did you mean 'data'"):
        config_from_dict({"dataa": {}})


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match=r"optim.lr: expected a number"):
        config_from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"data.batch_size: expected an integer"):
        config_from_dict({"data": {"batch_size": 1.5}})
    with pytest.raises(ConfigError, match=r"data.augment: must be one of"):
        config_from_dict({"data": {"augment": "heavy"}})
    with pytest.raises(ConfigError, match="top_k"):
        config_from_dict({"moe": {"num_experts": 2, "top_k": 3}})
    cfg = config_from_dict({"optim": {"lr": 1}})  # ints are fine where floats are expected
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_dotted_overrides():
    d = apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr=5e-4", "moe.num_experts=16", "run.ema_decay=null",
                                                 "model.args.img_size=28"])
    assert config_from_dict(d).optim.lr == 5e-4 and d["moe"]["num_experts"] == 16 and d["run"]["ema_decay"] is None
    assert d["model"]["args"]["img_size"] == 28
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["optim.lr"])


def test_yaml_with_python_tags_is_refused(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("optim: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_unknown_objective_args_are_refused_early():
    with pytest.raises(ConfigError, match=r"'objective_args.ogar_weigth'.*Did you mean 'ogar_weight'"):
        config_from_dict({"objective": "moco", "objective_args": {"ogar_weigth": 0.1}})
    with pytest.raises(ConfigError, match=r"objective_args.mask_ration"):
        config_from_dict({"objective": "mae", "objective_args": {"mask_ration": 0.5}})
    assert config_from_dict({"objective": "moco", "objective_args": {"ogar_weight": 0.1}}).objective == "moco"


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.name)
def test_every_variants_file_builds_on_its_base(path):
    """Each named variant applied to the base config beside it gives a valid experiment."""
    import json

    from visionmoe.sweep import load_variants
    from visionmoe.train import config_from_dict
    from visionmoe.train.config import apply_overrides, load_yaml_dict

    base = path.parent / ("fmnist_convnext_routing.yaml" if "convnext" in path.name else "fmnist_vit_routing.yaml")
    for ov in load_variants(path).values():
        config_from_dict(apply_overrides(load_yaml_dict(base), [f"{k}={json.dumps(v)}" for k, v in ov.items()]))
