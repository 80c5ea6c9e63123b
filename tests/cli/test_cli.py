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
    assert main(["demo", "--vmoe", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["test_accuracy"] > 0.5
    assert set(res["routing"]) == {"blocks.1", "blocks.3"}


def test_train_then_analyze_routing(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "model.name=vmoe_nano_patch4_32", "data.name=digits", "data.augment=none",
                 "model.args={img_size: 8, patch_size: 2, embed_dim: 24, depth: 2}", "moe.num_experts=4",
                 "schedule.max_steps=10", "run.progress=false", "--run-dir", str(run)]) == 0
    ckpt = next((run / "checkpoints").glob("*.safetensors"))
    out = tmp_path / "analysis"
    assert main(["analyze", str(ckpt), "--limit", "200", "--out", str(out)]) == 0
    res = json.loads((out / "analysis.json").read_text())
    assert res["num_experts"] == 4 and res["routing_degree"] == 4 ** len(res["blocks"])  # top-1
    for d in res["layers"].values():
        assert abs(sum(d["load"]) - 1) < 1e-5 and 1 <= d["distinct_experts_mean"] <= 4
        assert d["dropped_fraction"] == 0.0  # vmoe_nano is dropless
        assert all(abs(d["similarity"][i][i] - 1) < 1e-6 for i in range(4) if d["load"][i] > 0)
    for f in ("report.md", "routing_analysis.png", "token_routing.png"):
        assert (out / f).stat().st_size > 0


def test_sweep_grid_over_routers_and_models(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "data.name=digits", "data.augment=none", "data.img_size=32", "schedule.max_steps=3",
                 "run.eval_every_epochs=100", "--grid", "model.name=[vmoe_nano_patch4_32, convnext_moe_cpu]",
                 "--grid", "moe.router=[linear, cosine, l2]", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert len(rows) == 6
    for r in rows:
        assert 0 <= r["test_acc"] <= 1 and r["active_params"] < r["params"] and r["gflops_per_image"] > 0
    assert "| model.name |" in (out / "sweep.md").read_text()
    assert main(["sweep", "data.name=digits", "--grid", "moe.top_k=2"]) == 2  # not a list: clear error


def test_sweep_of_routing_variants_over_seeds_resumes(tmp_path, capsys):
    """The shipped routing-methods variants all build and train on the shipped base; the
    table is mean ± std over seeds (recomputed here), beside the raw-pixel probe; a resumed
    sweep trains only what is missing and refuses a point whose config changed."""
    out = tmp_path / "sweep"
    base = ["sweep", "configs/sweetspot/fmnist_vit_routing.yaml", "data.name=digits", "data.args={}",
            "data.augment=none", "model.args={img_size: 8, patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2}",
            "schedule.epochs=1"]
    opts = ["--variants", "configs/sweetspot/routing_methods.yaml", "--out", str(out), "--no-progress"]
    args = [*base, "schedule.max_steps=2", *opts]
    assert main([*args, "--grid", "run.seed=[0]"]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["variant"] for r in rows] == ["dense", "top1", "top2", "expert_choice", "soft", "lossfree_sigmoid",
                                            "finegrained_shared"]
    by = {r["variant"]: r for r in rows}
    assert by["dense"]["params"] == by["dense"]["active_params"] < by["top1"]["active_params"] < by["top1"]["params"]
    assert by["top2"]["gflops_per_image"] > by["top1"]["gflops_per_image"]
    (out / "variant-top1__seed-0").rename(tmp_path / "moved")  # kept on resume: not trained again
    capsys.readouterr()
    assert main([*base, "schedule.max_steps=2", *opts[:-1], "--grid", "run.seed=[0, 1]", "--resume"]) == 0  # with
    # progress shown this time: a display setting does not make a point another config
    rows2 = json.loads((out / "sweep.json").read_text())
    assert rows2[0] == rows[0] and len(rows2) == 14 and not (out / "variant-top1__seed-0").exists()
    table = (out / "sweep.md").read_text()
    assert "raw pixels, linear probe on the same training images: " in table
    dense = [r["test_acc"] for r in rows2 if r["variant"] == "dense"]
    from visionmoe._utils import fmt_mean_std, mean_std

    assert f"| dense | {fmt_mean_std(mean_std(dense), 4)} |" in table and "| seeds |" in table
    top1 = [r["test_acc"] for r in rows2 if r["variant"] == "top1"]  # seed-paired to the first variant
    assert f"- top1 - dense: {sum(a - b for a, b in zip(top1, dense)) / 2:+.3f} [" in table
    assert main([*base, "schedule.max_steps=3", *opts, "--grid", "run.seed=[0]", "--resume"]) == 2
    assert "trained with another config" in capsys.readouterr().err


def test_layer_scan_plots_accuracy_and_routing_degree(tmp_path):
    out = tmp_path / "scan"
    assert main(["layer-scan", "model.name=vmoe_nano_patch4_32", "data.name=digits", "data.augment=none",
                 "model.args={img_size: 8, patch_size: 2, embed_dim: 24, depth: 2}", "moe.num_experts=4",
                 "schedule.max_steps=3", "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert sorted((r["layers"], r["moe.shared_expert"]) for r in rows) == [
        (n, s) for n in range(3) for s in (False, True)]
    assert {r["layers"]: r["routing_degree"] for r in rows} == {0: 1, 1: 4, 2: 16}
    assert (out / "layer_scan.png").stat().st_size > 0


def test_layer_scan_over_seeds_reports_paired_differences(tmp_path):
    out = tmp_path / "scan"
    assert main(["layer-scan", "model.name=vmoe_nano_patch4_32", "data.name=digits", "data.augment=none",
                 "model.args={img_size: 8, patch_size: 2, embed_dim: 24, depth: 1}", "moe.num_experts=4",
                 "schedule.max_steps=3", "--out", str(out), "--no-progress", "--seeds", "0", "1"]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert sorted((r["layers"], r["moe.shared_expert"], r["run.seed"]) for r in rows) == [
        (n, s, sd) for n in range(2) for s in (False, True) for sd in (0, 1)]
    acc = {(r["layers"], r["moe.shared_expert"], r["run.seed"]): r["test_acc"] for r in rows}
    table = (out / "sweep.md").read_text()
    assert "| 2 |" in table  # two seeds per point
    # by hand: the mean over seeds of (with shared expert - without) at L=1
    d = [acc[1, True, sd] - acc[1, False, sd] for sd in (0, 1)]
    assert f"- L=1, with - without shared expert: {sum(d) / 2:+.3f} [" in table
    d = [acc[1, False, sd] - acc[0, False, sd] for sd in (0, 1)]
    assert f"- L=1, without shared expert - dense: {sum(d) / 2:+.3f} [" in table


def test_sweep_and_scan_refuse_missing_or_bad_config_files(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    assert main(["layer-scan", str(bad)]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import visionmoe.cli.main as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_train", interrupted)
    assert cli.main(["train", "cfg.yaml", "--run-dir", "runs/x"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "visionmoe: interrupted; continue with: visionmoe train cfg.yaml --run-dir runs/x --resume"
