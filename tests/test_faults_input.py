"""Faults in what a user hands the run: a data tree with a link loop, a data_path that is a file, a key given twice.

Each case goes through ``main.main(argv)`` on the tiny tree of ``tests/test_faults.py`` (one 7-iteration epoch).
"""
import os
import shutil

import pytest
import torch
import yaml

import main as entry
from tests.runs import load, one_line, read_log
from tests.test_faults import ITERS, args, make_tree

ONE_EPOCH = ["--epochs", "1", "--toe.expansion_steps", "[0]", "--toe.keep_rates", "[0.5]"]


def link_tree(real, root):
    """``real`` as users often lay ImageNet out: class folders of links to the images, one class folder that is a
    link to a folder elsewhere, ``val`` a link to the other split; and one class folder of copies with a link loop."""
    os.makedirs(os.path.join(root, "train"))
    for name in sorted(os.listdir(os.path.join(real, "train"))):
        src, dst = os.path.join(real, "train", name), os.path.join(root, "train", name)
        if name == "c5":
            os.symlink(src, dst)
            continue
        if name == "c3":
            shutil.copytree(src, dst)
            continue
        os.mkdir(dst)
        for image in os.listdir(src):
            os.symlink(os.path.join(src, image), os.path.join(dst, image))
    os.symlink(".", os.path.join(root, "train", "c3", "again"))          # c3/again/again/... until the OS gives up
    os.symlink(os.path.join(real, "val"), os.path.join(root, "val"))
    return root


def test_a_link_loop_is_walked_once_and_a_tree_of_links_trains_as_the_real_tree(tmp_path, capfd):
    real = make_tree(str(tmp_path / "real"))
    assert entry.main(args(real, tmp_path / "ref", *ONE_EPOCH)) == 0
    capfd.readouterr()
    linked = link_tree(real, str(tmp_path / "linked"))
    assert entry.main(args(linked, tmp_path / "run", *ONE_EPOCH)) == 0
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "skipped 1 link(s) to a folder already read" in warnings[0], warnings
    assert os.path.join("c3", "again") in warnings[0]
    assert read_log(tmp_path / "run")[0]["global_step"] == ITERS                 # 120 images, not 600
    ref, run = load(tmp_path / "ref" / "checkpoint.pth"), load(tmp_path / "run" / "checkpoint.pth")
    for name, tensor in ref["model"].items():                                    # the same images in the same order
        assert torch.equal(tensor, run["model"][name]), name


@pytest.mark.parametrize("data_set", ["folder", "digits"])
def test_a_data_path_that_is_a_file_says_so(tmp_path, capsys, data_set):
    a_file = tmp_path / "images.tar"
    a_file.write_bytes(b"not a directory")
    assert entry.main(args(str(a_file), tmp_path / "run", "--data_set", data_set)) == entry.EXIT_ERROR
    assert f"data_path {a_file} is a file, not a directory" in one_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["images.tar"]                       # nothing written
    assert a_file.read_bytes() == b"not a directory"


def test_a_repeated_key_the_last_value_wins_and_mappings_merge(tmp_path, capsys):
    tree = make_tree(str(tmp_path / "tree"))
    argv = args(tree, tmp_path / "run", *ONE_EPOCH)
    i = argv.index("--model_kwargs")        # TINY's model_kwargs, given in two halves, the later overriding a key
    argv[i:i + 2] = ["--model_kwargs", "{patch_size: 4, embed_dim: 64, depth: 2}",
                     "--model_kwargs", "{embed_dim: 32, num_heads: 2}"]
    argv += ["--epochs", "3", "--epochs", "1"]
    assert entry.main(argv) == 0
    saved = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    assert saved["model_kwargs"] == {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    assert saved["epochs"] == 1
    weights = load(tmp_path / "run" / "checkpoint.pth")["model"]
    assert weights["patch_embed.proj.weight"].shape == (32, 3, 4, 4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        entry.main(["--help"])
    assert done.value.code == entry.EXIT_OK
    assert "the last value wins, and mappings such as model_kwargs merge key by key" in " ".join(
        capsys.readouterr().out.split())
