"""The one AMP rule (devices.resolve_amp), used by training, evaluation and the measuring scripts alike."""
import importlib.util
import os

import pytest
import torch

from devices import AmpError, autocast, loss_scaler, resolve_amp
from tests.runs import ROOT, one_line

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)     # a cuda device object needs no GPU to exist


@pytest.mark.parametrize("amp,device,dtype", [
    ("auto", CPU, None), ("auto", GPU, torch.bfloat16), ("none", GPU, None), (None, GPU, None), ("", CPU, None),
    ("bf16", CPU, torch.bfloat16), ("bf16", GPU, torch.bfloat16), ("fp16", GPU, torch.float16),
])
def test_amp_setting_gives_the_dtype_of_its_device(amp, device, dtype):
    assert resolve_amp(amp, device) is dtype


def test_fp16_on_the_cpu_and_unknown_settings_are_one_line_naming_the_key():
    with pytest.raises(AmpError, match=r"^amp: 'fp16' needs a GPU; use bf16 or none on the CPU$"):
        resolve_amp("fp16", CPU)
    with pytest.raises(AmpError, match=r"^--amp: 'fp16' needs a GPU"):
        resolve_amp("fp16", CPU, "--amp")
    with pytest.raises(AmpError, match=r"^amp: 'fp8' is not one of auto, bf16, fp16, none$"):
        resolve_amp("fp8", GPU)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_autocast_is_on_only_with_a_dtype_and_fp16_alone_scales_the_loss():
    x = torch.ones(2, 2)
    with autocast(CPU, torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(CPU, None):
        assert (x @ x).dtype == torch.float32
    assert loss_scaler(None, CPU) is None and loss_scaler(torch.bfloat16, GPU) is None
    assert isinstance(loss_scaler(torch.float16, GPU), torch.amp.GradScaler)


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script,config", [("benchmark", "demo.yaml"), ("sweep", "deit_s_pss.yaml")])
def test_scripts_refuse_fp16_on_the_cpu_with_the_same_rule(script, config, tmp_path, capsys):
    argv = ["--config", os.path.join(ROOT, "configs", config), "--amp", "fp16", "--device", "cpu"]
    if script == "sweep":
        argv += ["--checkpoint", str(tmp_path / "never_read.pth")]
    assert _script(script).main(argv) == 2
    assert one_line(capsys.readouterr().err) == "error: --amp: 'fp16' needs a GPU; use bf16 or none on the CPU"
    assert list(tmp_path.iterdir()) == []
