"""The method plug-in interface, exercised by methods defined in this file only (no generic file knows them).

A dummy example-level method trains on the even dataset indices and checks what the engine hands it; a dummy token
reducer drops tokens before block 0. Both train through the real entrypoint on the embedded digits.
"""
import json
from dataclasses import dataclass


import pytest
import torch

import main as entry
from config import ConfigError, build_config, load_config
from methods import (Clock, Method, MethodError, MethodSet, TokenSite, Variant, parse_combination, register_method,
                     registry, unregister_method)
from models.tokens import TokenPositions, restore_grid, token_positions
from tests.runs import DEMO, TINY_MODEL, read_log

TINY = [*TINY_MODEL, "--epochs", "2", "--num_workers", "0", "--batch_size", "64", "--warmup_epochs", "1",
        "--print_freq", "5", "--tensorboard", "false"]


@dataclass
class EvenConfig:
    modulo: int = 2                        # train on the indices divisible by this


class Even(Method):
    """Trains on every ``modulo``-th example, counts iterations and the examples it observed."""
    name, label, Config = "even", "Even", EvenConfig
    per_step = True
    observes_examples = True

    def __init__(self, section, cfg):
        super().__init__(section, cfg)
        self.steps, self.observed, self.clocks = 0, [], []

    @classmethod
    def validate(cls, section, cfg):
        if section.modulo < 1:
            raise MethodError(f"even.modulo: {section.modulo} must be >= 1")

    def train_indices(self, epoch, dataset_len):
        return range(0, dataset_len, self.section.modulo)

    def on_step(self, clock: Clock):
        self.steps += 1
        self.clocks.append(clock)

    def observe(self, batch):
        assert batch.logits.shape == (len(batch.indices), 10) and not batch.logits.requires_grad
        assert torch.equal(batch.labels, batch.targets)            # no mixup in the demo recipe
        self.observed += batch.indices.tolist()

    def fields(self, scope):
        return {"even_steps": self.steps, "even_observed": len(self.observed)} if scope == "epoch" else {}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]

    def variants(self, num_patches, epochs, iters_per_epoch):
        return [Variant("Even", 1.0, lambda model: None, num_patches),
                Variant("Even again", 0.0, lambda model: (lambda: None), use="eval", key="even")]


@dataclass
class DropConfig:
    keep: int = 4                           # patch tokens kept (the first ones)
    site: float = 0.0


class Drop(Method):
    """Keeps the first ``keep`` patch tokens at the input of block 0 (a minimal token reducer)."""
    name, label, Config = "keepfirst", "KeepFirst", DropConfig

    def token_site(self):
        return TokenSite(self.section.site, what=f"keepfirst at {self.section.site}")

    def patch(self, model):
        positions = token_positions(model)
        keep = self.section.keep

        def hook(block, args):
            x = args[0]
            index = torch.arange(1 + keep, device=x.device).expand(x.shape[0], -1)
            positions.record(0, index)
            return (x[:, :1 + keep],)
        model.blocks[0].register_forward_pre_hook(hook)

    def variants(self, num_patches, epochs, iters_per_epoch):
        return [Variant(f"keep {self.section.keep}", 1.0, lambda model: None, self.section.keep)]


@pytest.fixture
def plugins():
    register_method(Even)
    register_method(Drop)
    yield
    unregister_method("even")
    unregister_method("keepfirst")


def test_a_method_registered_in_a_test_file_trains_through_main(plugins, digits, tmp_path):
    out = tmp_path / "run"
    args = ["--config", DEMO, "--data_path", digits, "--output_dir", str(out), *TINY, "--even", "{modulo: 2}",
            "--methods", "[even]"]
    assert entry.main(args) == 0
    log = read_log(out)
    n_train = 1442
    assert [r["train_examples"] for r in log] == [n_train // 2 + n_train % 2] * 2
    iters = log[0]["train_iters"]
    assert iters == (n_train // 2 + 1) // 64 and [r["even_steps"] for r in log] == [iters, 2 * iters]
    assert [r["global_step"] for r in log] == [iters, 2 * iters]
    assert all("val_even_acc1" in r and r["val_even_count"] == r["val_count"] for r in log)
    assert "toe_stage" not in log[0]                                    # only the active methods report
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["methods"] == {"even": {"steps": 2 * iters}} and ckpt["global_step"] == 2 * iters
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == {"even": {}}


def test_hooks_see_indices_and_the_clock(plugins, digits, tmp_path, monkeypatch):
    seen = {}
    real_init = Even.__init__

    def keep(self, *a, **k):
        real_init(self, *a, **k)
        seen["method"] = self
    monkeypatch.setattr(Even, "__init__", keep)
    args = ["--config", DEMO, "--data_path", digits, "--output_dir", str(tmp_path / "r"), *TINY,
            "--even", "{modulo: 3}", "--methods", "[even]", "--epochs", "1"]
    assert entry.main(args) == 0
    m = seen["method"]
    assert m.observed and all(i % 3 == 0 for i in m.observed)          # indices travel through the loader
    assert len(set(m.observed)) == len(m.observed)                      # no repeated augmentation in the demo
    assert [c.global_step for c in m.clocks] == list(range(len(m.clocks)))
    assert all(c.epoch == 0 and c.iters_per_epoch == len(m.clocks) and c.epochs == 1 for c in m.clocks)


def test_sections_overrides_and_active_list(plugins):
    cfg = load_config(DEMO, ["--even", "{}"])
    assert cfg.active_methods() == ["toe"] and cfg.even.modulo == 2       # demo.yaml lists its active methods
    cfg = load_config(DEMO, ["--even", "{}", "--methods", "[toe, even]"])
    assert MethodSet.from_config(cfg).names == ["toe", "even"]
    assert load_config(DEMO, ["--toe", "none"]).active_methods() == []
    assert load_config(DEMO, ["--even", "{modulo: 0}"]).even.modulo == 0     # inactive: run checks wait for activation
    for overrides, needle in [
        (["--even", "{modulo: 0}", "--methods", "[even]"], "even.modulo: 0 must be >= 1"),
        (["--even", "{modul: 3}"], "did you mean 'even.modulo'"),
        (["--methods", "[even]"], "has no even: section"),
        (["--methods", "[nope]"], "unknown method 'nope'"),
        (["--methods", "[toe, toe]"], "names a method twice"),
        (["--eveen", "{}"], "did you mean the method section 'even'"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(DEMO, overrides)
        assert needle in str(err.value) and "\n" not in str(err.value), overrides
    assert parse_combination("none") == [] and parse_combination("toe+even") == ["toe", "even"]
    with pytest.raises(MethodError):
        parse_combination("toe+nope")


def test_token_reducers_that_conflict_are_one_config_line(plugins):
    base = ["--keepfirst", "{}", "--toe.insert_block", "1"]
    # Drop at the input of block 0 reorders tokens before ToE, whose seeds are raster positions of the full grid
    with pytest.raises(ConfigError, match="toe needs the full patch grid at its input .* keepfirst already reduces"):
        load_config(DEMO, base + ["--methods", "[keepfirst, toe]"])
    with pytest.raises(ConfigError, match="both change the tokens at the same place"):
        load_config(DEMO, ["--keepfirst", "{site: 1.0}", "--methods", "[toe, keepfirst]"])
    assert load_config(DEMO, ["--keepfirst", "{site: 2.0}", "--methods", "[toe, keepfirst]"]).active_methods() == ["toe", "keepfirst"]


def test_positions_compose_over_sites_and_restore_the_grid():
    p = TokenPositions()
    assert p.before() is None and not p.reduced
    p.record(0, torch.tensor([[0, 3, 1, 4]]))          # CLS, then patches 3, 1, 4 (positions in the full list)
    p.record(1, torch.tensor([[0, 2, 3]]))             # keeps rows 0, 2, 3 of that: CLS, 1, 4
    p.record(1, torch.tensor([[0, 2, 3]]))             # a recomputed block writes its site again: no change
    assert p.before(0.5).tolist() == [[0, 3, 1, 4]] and p.before().tolist() == [[0, 1, 4]]
    x = torch.arange(3.0).view(1, 3, 1) + 1
    assert restore_grid(x, p.before(), 6).view(-1).tolist() == [1, 2, 0, 0, 3, 0]
    with pytest.raises(RuntimeError, match="no token reducer recorded"):
        restore_grid(x, None, 6)


def test_dense_model_restores_tokens_dropped_by_any_method(plugins):
    """LV-ViT scatters tokens back to the grid from what the reducer recorded, here the test's own Drop method."""
    from models import create_model
    cfg = build_config(dict(model="lvvit_t", input_size=64, drop_path=0.0, epochs=2, keepfirst={"keep": 5},
                            model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, stem_chans=8)))
    model = create_model(cfg, 10)
    tokens = model.forward_features(torch.randn(2, 3, 64, 64))
    model(torch.randn(2, 3, 64, 64))                   # the root call clears and re-records positions
    assert tokens.shape == (2, 17, 32)
    assert tokens[:, 6:].abs().sum() == 0 and (tokens[:, 1:6].abs().sum(-1) > 0).all()


def test_measurement_variants_of_a_combination_multiply_their_shares(plugins):
    cfg = load_config(DEMO, ["--keepfirst", "{site: 3.0}", "--methods", "[toe, keepfirst]", "--epochs", "45"])
    variants = MethodSet.from_config(cfg).variants(36, 45, 10)
    assert [v.label for v in variants] == ["ToE stage 1 + keep 4", "ToE stage 2 + keep 4", "ToE stage 3 + keep 4"]
    assert [v.share for v in variants] == pytest.approx([1 / 3] * 3) and [v.epochs for v in variants][0] == (0, 15)
    assert [v.patch_tokens for v in variants] == [4, 4, 4]
    assert set(registry()) >= {"keepfirst", "even", "toe", "pss"}


def test_a_method_may_not_take_the_name_of_a_config_key():
    class Dropout(Method):
        name, label, Config = "drop", "Dropout", EvenConfig
    register_method(Dropout)
    try:                # the config refuses it where it assembles the method sections
        with pytest.raises(ValueError, match="'drop' is a config key already"):
            load_config(DEMO)
    finally:
        unregister_method("drop")
    assert "drop" not in registry()
