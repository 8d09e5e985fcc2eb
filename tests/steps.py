"""The shared harness of the whole-step fixture tests (``tests/test_steps_*.py``).

A whole-step fixture (``tests/fixtures/*_step.pt``, written by ``tests/fixtures/generate_*.py`` from the published
code, see ``tests/fixtures/README.md``) holds, for a tiny model of a table config: the published parameter groups,
the initial weights, a batch and the method's random draws, the logits, the loss, every gradient, every parameter
after 3 optimizer steps, and the per-update lr and method state over the table config's whole run. The tests build
the same model through this project's own factory, config and optimizer builder and compare with it.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Mapping, Optional

import torch
from torch import nn

import checkpoint as ckpt_io
import main as entry
from config import Config, load_config
from models import create_model
from tests.reference import load_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def step_reference(name: str, env_var: str) -> Any:
    """A whole-step fixture: ``$env_var`` when set (it must name a file), else ``tests/fixtures/<name>``."""
    return load_reference(name, env_var)


def table_config(config: str, *overrides: str) -> Config:
    """A table config (``configs/<config>``) with command-line overrides, as ``main.py`` resolves it."""
    return load_config(os.path.join(CONFIGS, config), list(overrides))


def table_model(cfg: Config, num_classes: int, state: Optional[Mapping[str, torch.Tensor]] = None) -> nn.Module:
    """The config's model from this project's factory (methods patched in), with ``state`` (the published initial
    weights, in the published key layout) loaded through the model's own checkpoint conversion, all keys strict."""
    model = create_model(cfg, num_classes)
    if state is not None:
        ckpt_io.load_weights_strict(model, dict(state), "step fixture")
    return model


def parameter_groups(cfg: Config, model: nn.Module, lr: float = 1.0) -> Dict[str, Dict[str, float]]:
    """``name -> {weight_decay, lr_scale}`` of the optimizer this project builds for ``model`` (``lr_scale``: the
    group's lr at construction over ``lr``, whatever the mechanism that scales it)."""
    optimizer = entry.create_optimizer(cfg, model, lr)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {"weight_decay": float(g["weight_decay"]), "lr_scale": float(g["lr"] * g.get("lr_scale", 1.0) / lr)}
            for g in optimizer.param_groups for p in g["params"]}


def assert_groups(ours: Mapping[str, Mapping[str, float]], published: Mapping[str, Mapping[str, float]]) -> None:
    """The same parameters, each with the published weight decay and lr scale (relative 1e-12)."""
    assert set(ours) == set(published), (sorted(set(ours) ^ set(published)))[:8]
    for name, want in published.items():
        assert ours[name]["weight_decay"] == want["weight_decay"], (name, ours[name], want)
        assert abs(ours[name]["lr_scale"] - want["lr_scale"]) <= 1e-12 * abs(want["lr_scale"]), (name, ours[name], want)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a - e| / max |e|`` (0 for two zero tensors): the relative error of a whole tensor."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    err = max_rel_error(actual, expected)
    assert err <= rel, f"{what}: relative error {err:.3e} > {rel:.0e}"


def assert_all_close(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], rel: float = 1e-5,
                     what: str = "") -> None:
    """Every tensor of ``expected`` (by name) within ``rel`` of ``actual``'s; the worst one named on failure."""
    assert set(actual) == set(expected), (what, sorted(set(actual) ^ set(expected))[:8])
    worst = max(((max_rel_error(actual[k], expected[k]), k) for k in expected), default=(0.0, ""))
    assert worst[0] <= rel, f"{what}: {worst[1]} relative error {worst[0]:.3e} > {rel:.0e}"


def gradients(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def parameters(model: nn.Module, names: Iterable[str]) -> Dict[str, torch.Tensor]:
    own = dict(model.named_parameters())
    return {n: own[n].detach().clone() for n in names}


def split_key_bias(tensors: Mapping[str, torch.Tensor]):
    """``(tensors with the key third of every qkv bias zeroed, {name: that key third})``.

    The key bias has an exactly zero true gradient (attention ignores a shift of a query's row of logits, the same
    for every key), so what reaches it is float noise that AdamW (eps 1e-8) turns into updates differing between any
    two implementations: the step tests hold that third only to staying noise, everything else to 1e-5."""
    rest, keys = {}, {}
    for name, t in tensors.items():
        if name.endswith("attn.qkv.bias"):
            q, k, v = t.chunk(3)
            rest[name], keys[name] = torch.cat([q, torch.zeros_like(k), v]), k
        else:
            rest[name] = t
    return rest, keys
