import argparse

import pytest

from senformer import cli


@pytest.mark.parametrize("make", [cli.train_parser, cli.eval_parser, cli.predict_parser])
def test_help_documents_every_option(make, capsys):
    parser = make()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{parser.prog}: {action.dest} has no help text"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in text


def test_train_print_config_applies_flags(capsys):
    assert cli.train_main(["ade20k_r50", "--iters", "7", "--lr", "3e-4", "--crop-size", "256,320",
                           "--set", "optim.weight_decay=0.05", "--print-config"]) == 0
    import yaml
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["schedule"]["iters"] == 7 and cfg["optim"]["lr"] == 3e-4 and cfg["data"]["crop_size"] == [256, 320]
    assert cfg["optim"]["weight_decay"] == 0.05 and cfg["model"]["preset"] == "senformer_r50"


def test_wrong_data_root_lists_the_expected_layout(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.train_main(["ade20k_r50", "--data-root", str(tmp_path), "--no-progress", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "Expected layout" in err and "annotations/{training,validation}" in err


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        cli.train_main(["--crop-size", "0"])
    assert "--crop-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.train_main(["--set", "nosuchsection.x=1", "--print-config"])
    assert "nosuchsection" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.train_main(["no_such_config", "--print-config"])
    assert "available" in capsys.readouterr().err


def test_convert_entry_point_is_lazy():
    assert callable(cli.convert_main)


def test_train_eval_on_a_generic_folder_dataset(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (30 + i, 41, 3)).astype(np.uint8)).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 3, (30 + i, 41)).astype(np.uint8)).save(root / "masks" / split / f"{i}.png")
    (tmp_path / "names.txt").write_text("grass\nsky\nroad\n")
    wd = tmp_path / "run"
    cli.train_main(["--dataset", "folder", "--data-root", str(root), "--classes", str(tmp_path / "names.txt"),
                    "--model", "toy", "--iters", "2", "--batch-size", "2", "--crop-size", "32", "--num-workers", "1",
                    "--set", "data.scale=[41,30]", "--work-dir", str(wd), "--no-progress", "--device", "cpu"])
    assert "on 2 val images" in capsys.readouterr().out
    cli.eval_main([str(wd), "--no-progress"])
    out = capsys.readouterr().out
    assert "sky" in out and "road" in out
