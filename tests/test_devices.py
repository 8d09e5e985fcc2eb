"""The one device rule and the one AMP rule (devices.resolve_device, devices.resolve_amp), used by training,
evaluation and the scripts alike."""
import importlib.util
import os

import pytest
import torch

from devices import AmpError, DeviceError, autocast, loss_scaler, resolve_amp, resolve_device
from tests.runs import ROOT, one_line

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)     # a cuda device object needs no GPU to exist
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")


@no_gpu
def test_auto_is_the_cpu_without_a_gpu_and_a_gpu_asked_for_is_an_error_naming_the_key():
    assert resolve_device("auto") == resolve_device("cpu") == resolve_device(None) == CPU
    with pytest.raises(DeviceError, match=r"^device: 'cuda' was asked for but no GPU is visible \(CUDA_VISIBLE_DEV"
                                          r"ICES, driver\); use device: auto or cpu$"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match=r"^--device: 'cuda:1' was asked for but no GPU is visible .*; use --device "
                                          r"auto or cpu$"):
        resolve_device("cuda:1", key="--device")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", "mps"])
def test_unknown_devices_are_one_line(name):
    with pytest.raises(DeviceError, match=rf"^--device: '{name}' is not one of auto, cpu, cuda, cuda:N$"):
        resolve_device(name, key="--device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_is_this_processs_gpu_and_cuda_n_a_given_one():
    count = torch.cuda.device_count()
    assert resolve_device("auto") == resolve_device("cuda") == GPU
    assert resolve_device("cuda", local_rank=count - 1) == resolve_device(f"cuda:{count - 1}") == torch.device(
        "cuda", count - 1)
    with pytest.raises(DeviceError, match=rf"^device: 'cuda' is GPU {count}, this process's GPU \(local rank "):
        resolve_device("cuda", local_rank=count)


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


@no_gpu
@pytest.mark.parametrize("script,config", [("benchmark", "demo.yaml"), ("sweep", "deit_s_pss.yaml")])
def test_scripts_refuse_a_gpu_that_is_not_there_with_the_same_rule(script, config, tmp_path, capsys):
    argv = ["--config", os.path.join(ROOT, "configs", config), "--device", "cuda"]
    if script == "sweep":
        argv += ["--checkpoint", str(tmp_path / "never_read.pth")]
    assert _script(script).main(argv) == 2
    assert one_line(capsys.readouterr().err).startswith("error: --device: 'cuda' was asked for but no GPU is visible")
