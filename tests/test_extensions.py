"""Extensions (:mod:`extensions`): config sections that change what the model learns from. The generic files never
name one (token labeling is the one shipped), and a throw-away extension registered here reaches a real run: its
section parses, validates, is listed by --help and saved with the run, it wraps the training set, replaces the
criterion and checks the model, and it is not a method."""
import os
import re
from dataclasses import dataclass, field

import pytest
import torch
import yaml
from torch import nn

from config import ConfigError, load_config
from datasets import DatasetError
from extensions import Extension, ExtensionError, ExtensionSet, extension_classes, register_extension, unregister_extension
from methods import MethodSet
from tests.runs import DEMO, ROOT, TINY, runner

GENERIC_FILES = ["main.py", "engine.py", "config.py", "datasets.py", "checkpoint.py", "plan.py", "measure.py",
                 "flop_count.py", "throughput.py", "exits.py", "parts.py", "recipe.py", "resume.py", "logger.py",
                 "rundir.py", "config_help.py", "config_sources.py", "extensions.py"]
TOKEN_LABELING = re.compile(r"token.?label", re.IGNORECASE)


def test_generic_files_never_name_token_labeling():
    hits = []
    for name in GENERIC_FILES:
        path = os.path.join(ROOT, name)
        if not os.path.exists(path):        # a generic module that is gone names nothing
            continue
        with open(path) as f:
            hits += [f"{name}:{n}: {line.strip()}" for n, line in enumerate(f, 1) if TOKEN_LABELING.search(line)]
    assert not hits, "\n".join(hits)
    assert "main.py" in [n for n in GENERIC_FILES if os.path.exists(os.path.join(ROOT, n))]   # the walk read files


def test_token_labeling_is_an_extension_and_not_a_method():
    from token_labels import TokenLabelError
    assert extension_classes()["token_label"].Config.__name__ == "TokenLabelConfig"
    cfg = load_config(os.path.join(ROOT, "configs", "lvvit_t_toe.yaml"))
    assert cfg.token_label is not None and cfg.active_methods() == ["toe"]
    assert MethodSet.from_config(cfg).names == ["toe"] and ExtensionSet.from_config(cfg).names == ["token_label"]
    assert "token_label" in cfg.to_dict() and load_config(DEMO).to_dict()["token_label"] is None   # saved as null when off
    with pytest.raises(ConfigError, match="methods: unknown method 'token_label'"):
        load_config(os.path.join(ROOT, "configs", "lvvit_t.yaml"), ["--methods", "[token_label]"])
    with pytest.raises(ConfigError, match=r"^token_label.cls_weight: -1.0 must be >= 0$"):
        load_config(os.path.join(ROOT, "configs", "lvvit_t.yaml"), ["--token_label.cls_weight", "-1"])
    with pytest.raises(ConfigError, match=r"^mixup: must be 0 with token_label"):
        load_config(os.path.join(ROOT, "configs", "lvvit_t.yaml"), ["--mixup", "0.8"])
    from exits import RUN_ERRORS
    assert issubclass(TokenLabelError, DatasetError) and isinstance(TokenLabelError("x"), RUN_ERRORS)   # exit code 1


# ------------------------------------------------------------------------------------- a throw-away extension
SEEN = {"items": 0, "losses": 0, "models": 0, "datasets": []}


class CountingDataset(torch.utils.data.Dataset):
    """The training set, counting the samples it hands out."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        SEEN["items"] += 1
        return self.dataset[i]


class CountingLoss(nn.Module):
    def __init__(self, smoothing):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(label_smoothing=smoothing)

    def forward(self, images, outputs, targets):
        SEEN["losses"] += 1
        return self.ce(outputs, targets)


@dataclass
class CounterConfig:
    """Counts what the run feeds through it."""
    smoothing: float = 0.0                                                       # label smoothing of its loss
    mode: str = field(default="count", metadata={"choices": ("count", "refuse")})   # count | refuse: fail validation


class Counter(Extension):
    name = "sample_counter"
    Config = CounterConfig

    @classmethod
    def validate(cls, section, cfg):
        if section.mode == "refuse":
            raise ExtensionError("sample_counter.mode: 'refuse' refuses every config; use count")

    def check_model(self, model):
        SEEN["models"] += 1

    def train_dataset(self, dataset, cfg):
        SEEN["datasets"].append(len(dataset))
        return CountingDataset(dataset)

    def criterion(self, nb_classes):
        return CountingLoss(self.section.smoothing)


@pytest.fixture
def counter():
    register_extension(Counter)
    SEEN.update(items=0, losses=0, models=0, datasets=[])
    try:
        yield Counter
    finally:
        unregister_extension(Counter.name)
    assert "sample_counter" not in extension_classes()


def test_a_registered_extension_is_a_config_section(counter):
    cfg = load_config(DEMO, ["--sample_counter", "{smoothing: 0.1}"])
    assert cfg.sample_counter == CounterConfig(smoothing=0.1) and cfg.active_methods() == ["toe"]
    assert MethodSet.from_config(cfg).names == ["toe"]
    assert load_config(DEMO).sample_counter is None
    with pytest.raises(ConfigError, match=r"^sample_counter.mode: 'other' is not one of count, refuse$"):
        load_config(DEMO, ["--sample_counter.mode", "other"])
    with pytest.raises(ConfigError, match=r"^sample_counter.mode: 'refuse' refuses every config; use count$"):
        load_config(DEMO, ["--sample_counter.mode", "refuse"])
    with pytest.raises(ConfigError, match="did you mean 'sample_counter'"):
        load_config(DEMO, ["--sample_countr", "{}"])
    from config_help import key_rows
    rows = {r[1]: r for r in key_rows()}
    assert rows["sample_counter.mode"][0].startswith("sample_counter: section") and "refuse" in rows["sample_counter.mode"][4]


def test_a_registered_extension_feeds_a_real_run(counter, digits, tmp_path):
    out = tmp_path / "run"
    run = runner(*TINY, "--epochs", "1", "--toe", "none", "--sample_counter", "{smoothing: 0.1}")
    assert run(digits, out) == 0
    assert SEEN["datasets"] == [1442]                          # the training split only, wrapped once
    assert SEEN["models"] == 1
    assert SEEN["losses"] == 1442 // 128                       # every training step used its criterion
    assert SEEN["items"] == SEEN["losses"] * 128               # and every trained sample came through its dataset
    with open(out / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["sample_counter"] == {"smoothing": 0.1, "mode": "count"}
    assert load_config(str(out / "config.yaml")).sample_counter == CounterConfig(smoothing=0.1)


def test_two_extensions_may_not_both_replace_the_criterion(counter):
    cfg = load_config(DEMO, ["--sample_counter", "{}"])
    twice = ExtensionSet([Counter(cfg.sample_counter, cfg), Counter(cfg.sample_counter, cfg)])
    with pytest.raises(ExtensionError, match="sample_counter and sample_counter both replace the training criterion"):
        twice.criterion(10)
    assert isinstance(ExtensionSet.from_config(cfg).criterion(10), CountingLoss)
    assert ExtensionSet.from_config(load_config(DEMO)).criterion(10) is None
