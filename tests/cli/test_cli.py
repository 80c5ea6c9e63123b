import json

from visionmoe.cli.main import main


def test_list_models_and_info(capsys):
    assert main(["list-models", "vmoe*"]) == 0
    out = capsys.readouterr().out
    assert "vmoe_tiny_patch4_32" in out and "vit_tiny" not in out
    assert main(["info", "vmoe_small_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "32 experts, top-2" in out and "active" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "vmoe_smal_patch16_224"]) == 2
    assert "Did you mean 'vmoe_small_patch16_224'" in capsys.readouterr().err


def test_quick_demo_runs_and_beats_chance(tmp_path):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["test_accuracy"] > 0.5
    assert set(res["routing"]) == {"blocks.1", "blocks.3"}
