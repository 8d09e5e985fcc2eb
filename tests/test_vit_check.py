"""The one is-it-a-ViT rule (models.vit_problem / models.check_vit): the trainer and every method's patch() refuse a
model without patch tokens and ``blocks`` with the same reason, in one line naming the key."""
import pytest
import timm
import torch

from config import ConfigError, load_config
from methods import MethodError, MethodSet, method_class
from models import check_vit, vit_problem
from parts import build_model
from tests.runs import DEMO

SWIN = ["--model", "swin_tiny_patch4_window7_224", "--input_size", "32", "--methods", "[]", "--model_kwargs",
        "{embed_dim: 16, depths: [1, 1], num_heads: [1, 1], window_size: 4}"]


def test_a_vit_passes_and_gives_its_patch_tokens():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    assert vit_problem(vit) is None and check_vit(vit, "toe") == 16


def test_the_trainer_refuses_a_timm_model_without_blocks():
    """Swin takes img_size like a ViT (so timm builds it) and has a patch embedding, but stages instead of blocks."""
    with pytest.raises(ConfigError, match=r"^model: swin_tiny_patch4_window7_224 is not a ViT \(SwinTransformer has no "
                                          r"patch tokens and `blocks`\); this trainer takes timm Vision Transformers"):
        build_model(load_config(None, SWIN), 10, MethodSet([]))


@pytest.mark.parametrize("name", ["toe", "pss", "trilevel", "efficienttrain"])
def test_every_method_refuses_a_non_vit_with_the_same_rule(name):
    cfg = load_config(DEMO, ["--methods", f"[{name}]"])
    method = method_class(name)(cfg.sections[name], cfg)
    not_a_vit = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten())
    with pytest.raises(MethodError, match=rf"^{name}: Sequential has no patch tokens and `blocks`; {name} needs a "
                                          r"timm-style ViT"):
        method.patch(not_a_vit)
