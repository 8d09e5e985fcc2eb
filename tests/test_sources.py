"""Issue 15, items 7 and 14: the PSS repository's DeiT-S-384 baseline as a config and a published row, and the
provenance of every published figure in the repository itself (docs/sources.md), never in a folder a clone lacks."""
import importlib.util
import os
import re

import pytest
import timm
import torch

import methods
from config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SOURCES = os.path.join(ROOT, "docs", "sources.md")
# BradMcDanel/pss @ 90c12ba, deit/configs/deit-s-384/baseline.sh: torch.distributed.launch --nproc_per_node=4
# main.py --model deit_small_patch16_384_384 --epochs 300 --batch-size 128 --input-size 384 (the DeiT recipe otherwise)
PUBLISHED_LAUNCH = dict(nproc=4, batch_size=128, epochs=300, input_size=384)


def _tables():
    spec = importlib.util.spec_from_file_location("tables_for_sources", os.path.join(ROOT, "scripts", "tables.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(paper, name):
    return next(r for r in methods.published_rows() if (r.paper, r.row) == (paper, name))


# ------------------------------------------------------------------------------------------- item 7: DeiT-S-384
def test_deit_s_384_resolves_to_the_published_launch():
    from main import scaled_lr
    from plan import plan
    cfg = load_config(os.path.join(CONFIGS, "deit_s_384.yaml"))
    assert {k: getattr(cfg, k) for k in PUBLISHED_LAUNCH} == PUBLISHED_LAUNCH
    assert cfg.total_epochs() == 300 and cfg.grad_accum_steps == 1 and cfg.active_methods() == []
    assert scaled_lr(cfg, 4) == pytest.approx(5e-4)                       # DeiT's rule: 5e-4 x 512 / 512
    rows, totals = plan(cfg)
    assert totals["nproc"] == 4 and totals["epochs"] == 300
    assert {r["state"]["batch"] for r in rows} == {"128 x 4 x 1 = 512"}
    assert {r["state"]["input_size"] for r in rows} == {384}
    # the same recipe as the published PSS run at 384 px: only the model and the PSS section differ
    pss = load_config(os.path.join(CONFIGS, "deit_s_384_pss.yaml")).to_dict()
    ours = cfg.to_dict()
    assert {k for k in set(ours) | set(pss) if ours.get(k) != pss.get(k)} == {"model", "output_dir", "pss", "reproduces"}
    assert ours.get("pss") is None


def test_deit_s_384_model_is_plain_timm_deit_s_at_384():
    """vit_small_patch16_384 (timm 1.0 has no deit_small_patch16_384) is timm's DeiT-S built at 384 px: the same
    modules and, from one seed, the same weights; CLS pooling, no relative position bias."""
    from models import create_model
    cfg = load_config(os.path.join(CONFIGS, "deit_s_384.yaml"))
    torch.manual_seed(0)
    ours = create_model(cfg, 1000)
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=1000, drop_path_rate=cfg.drop_path,
                             img_size=384)
    assert type(ours) is type(deit) is timm.models.vision_transformer.VisionTransformer
    a, b = ours.state_dict(), deit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert ours.patch_embed.num_patches == 576 and ours.global_pool == "token"
    assert not any("relative_position" in k for k in a)
    assert repr(ours) == repr(deit)              # same modules and their settings
    flags = ("global_pool", "num_prefix_tokens", "no_embed_class", "pos_embed_reg_tokens", "dynamic_img_size")
    assert {k: getattr(ours, k, None) for k in flags} == {k: getattr(deit, k, None) for k in flags}


def test_deit_s_384_matches_its_row_with_the_published_figures_only():
    tables = _tables()
    cfg = load_config(os.path.join(CONFIGS, "deit_s_384.yaml"))
    row = _row("pss", "DeiT-S-384")
    assert cfg.reproduces == {"paper": "pss", "row": "DeiT-S-384"} and tables.matches(cfg, row)
    assert [(r.paper, r.row) for r in tables.published_for(cfg, methods.published_rows())] == [("pss", "DeiT-S-384")]
    # the README gave "~150h" (still training) and "?" for accuracy: nothing else is filled in
    assert (row.train_time, row.time_unit, row.gpus) == (150.0, "h", "4 x A100") and "approximate" in row.precision
    assert (row.top1, row.top1_final, row.top1_best, row.gflops, row.speedup, dict(row.sweep)) == \
        (None, None, None, None, None, {})
    # neither the 224 px baseline nor the PSS run at 384 px is a run of this row
    for other in ("deit_s.yaml", "deit_s_pss_baseline.yaml", "deit_s_384_pss.yaml"):
        assert not tables.matches(load_config(os.path.join(CONFIGS, other)), row), other


# ------------------------------------------------------------------------------------------- item 14: sources
def _product_files():
    """What a user's clone holds and reads: everything but the tests, the virtual environment and git."""
    for base, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "runs", "__pycache__", "data")]
        for name in files:
            if name.endswith((".py", ".yaml", ".yml", ".md", ".sh", ".txt")):
                yield os.path.join(base, name)


def test_no_product_file_points_at_a_folder_outside_the_repository():
    offenders = []
    for path in _product_files():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if re.search(r"(?<![\w-])shared/|\b(papers|toe_tables|anchors)\.md\b", line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{n}")
    assert not offenders, offenders


def test_sources_page_covers_every_published_row():
    """docs/sources.md has a section per paper of the published rows, naming each table the rows come from, and
    every repository commit a row cites; the README links it."""
    with open(SOURCES, encoding="utf-8") as f:
        text = f.read()
    sections = {m.group(1): m.start() for m in re.finditer(r"^## .*?`(\w+)`", text, re.M)}
    starts = sorted(sections.values()) + [len(text)]
    body = {p: text[s:starts[starts.index(s) + 1]] for p, s in sections.items()}
    rows = methods.published_rows()
    assert {r.paper for r in rows} <= set(body), {r.paper for r in rows} - set(body)
    for r in rows:
        assert f"`{r.table}`" in body[r.paper], (r.paper, r.table)
        for commit in re.findall(r"@ ?([0-9a-f]{7})\b", r.source):
            assert commit in text, (r.row, commit)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "docs/sources.md" in f.read()
