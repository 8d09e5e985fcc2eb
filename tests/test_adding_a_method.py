"""docs/adding_a_method.md's worked example, run as written: its package and its config are copied out of the page,
then the method trains through main.main, is planned, is counted and refuses a state that changes nothing."""
import dataclasses
import importlib
import json
import os
import re
import shutil
import sys

import pytest
import torch

import main as entry
import measure
import methods
from config import load_config
from plan import plan
from tests.runs import CONFIGS, ROOT, TINY_MODEL

PAGE = os.path.join(ROOT, "docs", "adding_a_method.md")
FAST = [*TINY_MODEL, "--epochs", "2", "--num_workers", "0", "--batch_size", "128", "--warmup_epochs", "1",
        "--print_freq", "5"]


def page_files():
    """``{path: text}`` of every code block of the page whose first line is a comment naming a file."""
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", open(PAGE).read(), flags=re.S)
    out = {}
    for block in blocks:
        first = block.splitlines()[0]
        m = re.match(r"#\s*([\w/]+\.(?:py|yaml))\b", first)
        if m:
            out[m.group(1)] = block
    return out


@pytest.fixture
def worked_example(tmp_path):
    """The page's package importable from ``tmp_path`` (registered), its config beside a copy of demo.yaml."""
    files = page_files()
    assert set(files) == {"patchdropout/method.py", "configs/demo_patchdropout.yaml"}
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "patchdropout" / "__init__.py").write_text("")
    shutil.copy(os.path.join(CONFIGS, "demo.yaml"), tmp_path / "configs")
    sys.path.insert(0, str(tmp_path))
    module = importlib.import_module("patchdropout.method")
    try:
        yield module, str(tmp_path / "configs" / "demo_patchdropout.yaml")
    finally:
        methods.unregister_method("patchdropout")
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == "patchdropout" or n.startswith("patchdropout.")]:
            del sys.modules[name]


def test_the_worked_example_trains_plans_and_is_measured(worked_example, digits, tmp_path):
    module, config = worked_example
    assert "patchdropout" in methods.registry()
    out = tmp_path / "run"
    assert entry.main(["--config", config, "--data_path", digits, "--output_dir", str(out), *FAST]) == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["patchdropout_keep_rate"] for r in log] == [0.5, 0.5] and "toe_stage" not in log[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == {"patchdropout": {"keep_rate": 0.5}}

    cfg = load_config(config, ["--data_path", digits, *FAST])
    rows, totals = plan(cfg)
    assert totals["ideal_speedup"] > 1.5                   # half of the 16 patch tokens in every block
    report = measure.model_flops(cfg, 10)
    (state,) = report["variants"]
    assert state.patch_tokens == 8 and report["num_patches"] == 16
    assert state.fvcore.total < 0.6 * report["full"].fvcore.total

    # the operator trains on a random half of the patches, and evaluation sees all of them
    model = entry.build_model(cfg, 10, methods.MethodSet.from_config(cfg))
    (op,) = methods.MethodSet.op_modules(model)
    assert isinstance(op, module.RandomKeep)
    x = torch.randn(4, 3, 16, 16)
    model.train()(x)
    assert op.kept_index.shape == (4, 1 + 8)
    model.eval()(x)
    assert op.kept_index is None


def test_a_state_that_changes_nothing_in_eval_mode_is_refused(worked_example, digits):
    module, config = worked_example
    cfg = load_config(config, ["--data_path", digits, *FAST])
    original = module.PatchDropout.variants

    def silent(self, *args):                # the same state, but its apply forgets to force the operator on in eval
        return [dataclasses.replace(v, apply=lambda model: None) for v in original(self, *args)]
    module.PatchDropout.variants = silent
    try:
        with pytest.raises(methods.MethodError, match="declares 8 of 16 patch tokens but the model ran all 16"):
            measure.model_flops(cfg, 10)
    finally:
        module.PatchDropout.variants = original
    assert measure.model_flops(cfg, 10)["variants"][0].patch_tokens == 8
