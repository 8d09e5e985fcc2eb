"""Tri-Level E-ViT as a method plug-in: the ``trilevel:`` config section and its hooks into the trainer.

Three levels, each switched on alone or together (``example_level`` / ``token_level`` / ``attention_level``):

* examples (:mod:`.examples`): the run trains on a subset of the dataset (``1 - pool_fraction`` of it); every
  presentation of an example records whether it was classified correctly (the argmax of the output on the possibly
  mixed image against the example's own label before mixup/cutmix, as the published engine does); every
  ``swap_interval`` epochs (at most ``max_swaps`` times) the ``remove_n`` least-forgotten examples leave the subset
  and as many come back from the pool. ``train_indices`` hands the subset to the sampler; ``observe`` records.
* tokens and attention connections (:mod:`.patch`): every block of the live timm model runs the published masked
  attention; at ``pruning_loc`` the patch tokens are pruned by CLS attention and the connection mask is built. The
  ratios follow the per-iteration warm-up + cosine schedule (``on_step``); evaluation runs at the targets, as
  published, and with ``eval_dense`` also on all tokens with dense attention (logged as ``val_dense_*``).

A level that is off is exactly that: no subset (example level), a keep ratio fixed at 1 (token level: nothing is
dropped, the published model still reorders the tokens by score) or an attention ratio fixed at 1 (all-ones masks).
With the token and attention levels both off the model is not patched at all (plain timm), unless the ``cls``
tie-break needs the CLS attention of the masked blocks.

Distributed (``sync``): ``global`` (the default) records every process's presentations on every process (one
``all_gather`` of ``[ids, correct, cls_var]`` per step), so all processes hold the same statistics, make the same
swap and train on one subset of the dataset; ``per_rank`` is the published behaviour: each process draws its own
subset (seeded ``seed + rank``) and keeps, sorts and swaps on its own statistics. The default is ``global`` because
the swap then rests on every presentation of an example (under ``per_rank`` a process sees only ``1/world`` of its
own subset per epoch, so over a 30-epoch window an example gets about ``30/world`` presentations: on the authors'
4 GPUs about 8 of the 30 counted), the subset is one well-defined part of the dataset, and a checkpoint does not
depend on the number of processes. On one process both modes are the same. The configs of the published rows use
``per_rank`` (and ``sort_kind: quicksort``): the published data regime.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from files import first_line
from methods import Clock, ExampleBatch, Method, MethodError, TokenSite, Variant, register_method
from models import check_vit, num_patches

from .cost import ForwardCost, ViTDims, representative_states, stage_tokens
from .examples import ExampleLevel, ExampleSelector, SwapResult, cls_attention_variance, swap_epochs
from .patch import apply_trilevel, iter_prune_ops, iter_trilevel, set_forced
from .schedule import RatioSchedule, TriLevelConfigError, check_pruning_loc, check_ratio

SYNC_MODES = ("global", "per_rank")
TIE_BREAKS = ("none", "cls")
SORT_KINDS = ("stable", "quicksort")


@dataclass
class TriLevelConfig:
    """Tri-Level E-ViT (Kong et al., AAAI 2023). Defaults: the published argparse defaults and schedule constants."""
    # --- which levels run (each can run alone) -------------------------------------------------------------------
    example_level: bool = True         # train on a subset, swap the least-forgotten examples for pool ones
    token_level: bool = True           # prune patch tokens by CLS attention at pruning_loc (off: keep ratio 1)
    attention_level: bool = True       # mask attention connections after pruning_loc (off: attention ratio 1)
    # --- token and attention levels ------------------------------------------------------------------------------
    keep_ratio: float = 0.7            # target token keep ratio r per pruning location (compounds: r, r^2, r^3)
    attn_ratio: float = 0.3            # target attention keep ratio a (connections kept per query row)
    pruning_loc: List[int] = field(default_factory=lambda: [3, 6, 9])     # 0-based blocks
    warmup_epochs: int = 10            # both ratios 1 for these epochs ...
    decay_epochs: int = 100            # ... then a per-iteration cosine to the targets over these, then constant
    eval_dense: bool = False           # also evaluate on all tokens with dense attention (val_dense_*)
    # run timm's own (fused-attention) blocks while both ratios are 1 instead of the published masked form, which
    # differs by ~1e-6 and costs the unfused attention (not published; off by default)
    dense_warmup: bool = False
    # --- example level -------------------------------------------------------------------------------------------
    pool_fraction: float = 0.2         # of the dataset set aside before training (the removed pool)
    remove_n: int = 0                  # examples swapped at every swap (published default 0; README 64058)
    keep_lowest_n: int = 0             # start of the removed slice in the ascending forgetting order
    swap_interval: int = 30            # a swap at the start of every multiple of this epoch ...
    max_swaps: int = 5                 # ... at most this many times
    npresentations: int = 30           # presentations since the last swap whose forgetting events count
    tie_break: str = field(default="none", metadata={"choices": TIE_BREAKS})   # cls: main-cls.py's CLS variance
    sync: str = field(default="global", metadata={"choices": SYNC_MODES})     # see the module docstring
    # sort of the forgetting counts: stable (ties in order of first presentation) or numpy's quicksort, the
    # published np.argsort default (its order within ties is machine-dependent)
    sort_kind: str = field(default="stable", metadata={"choices": SORT_KINDS})


def _example_level(s: TriLevelConfig) -> ExampleLevel:
    return ExampleLevel(remove_n=s.remove_n, keep_lowest_n=s.keep_lowest_n, npresentations=s.npresentations,
                        interval=s.swap_interval, max_swaps=s.max_swaps, initial_removal=s.pool_fraction,
                        tie_break="cls_var" if s.tie_break == "cls" else "none", sort_kind=s.sort_kind)


def _dist() -> Tuple[int, int]:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """Where collectives of small tensors run: the current GPU under NCCL, else the CPU."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _has_cls_token(cfg: Any) -> Optional[str]:
    """Why ``cfg``'s model kwargs rule out a CLS token read by the head, or ``None``."""
    kw = cfg.model_kwargs or {}
    if kw.get("class_token") is False:
        return "model_kwargs class_token: false"
    if kw.get("global_pool") not in (None, "token"):
        return f"model_kwargs global_pool: {kw['global_pool']}"
    return None


@register_method
class TriLevel(Method):
    name = "trilevel"
    label = "Tri-Level"
    Config = TriLevelConfig
    per_step = True
    observes_examples = True

    def __init__(self, section: TriLevelConfig, cfg: Any):
        super().__init__(section, cfg)
        s = section
        self.epochs = cfg.epochs
        self.seed = int(cfg.seed)
        self.keep_target = s.keep_ratio if s.token_level else 1.0
        self.attn_target = s.attn_ratio if s.attention_level else 1.0
        self.schedule = RatioSchedule(self.keep_target, self.attn_target, s.warmup_epochs, s.decay_epochs)
        self.sparse = s.token_level or s.attention_level
        self.patches = self.sparse or (s.example_level and s.tie_break == "cls")
        # instance flags: the engine only calls what is needed
        self.per_step = self.sparse
        self.observes_examples = s.example_level
        self.level = _example_level(s) if s.example_level else None
        self.selector: Optional[ExampleSelector] = None
        self._states: list = []
        self._states_of: Optional[list] = None
        self._patched_patches = 0
        self.depth = 0
        self.dims: Optional[ViTDims] = None
        self.ratios = (1.0, 1.0)
        self.epoch = 0
        self.swap_this_epoch: Optional[SwapResult] = None
        self.presented_this_epoch = 0
        self.correct_this_epoch = 0

    # --- configuration --------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, section: TriLevelConfig, cfg: Any) -> None:
        s = section
        try:
            for key in ("keep_ratio", "attn_ratio"):
                check_ratio(getattr(s, key), key)
            check_pruning_loc(s.pruning_loc, 10 ** 9)
        except TriLevelConfigError as e:
            raise MethodError(str(e)) from None
        for key, low in (("warmup_epochs", 0), ("decay_epochs", 0), ("remove_n", 0), ("keep_lowest_n", 0),
                         ("swap_interval", 1), ("max_swaps", 0), ("npresentations", 1)):
            if getattr(s, key) < low:
                raise MethodError(f"trilevel.{key}: {getattr(s, key)} must be >= {low}")
        if not 0.0 <= s.pool_fraction < 1.0:
            raise MethodError(f"trilevel.pool_fraction: {s.pool_fraction} must lie in [0, 1)")
        if not (s.example_level or s.token_level or s.attention_level):
            raise MethodError("trilevel: example_level, token_level and attention_level are all false; switch one "
                              "on or drop trilevel from methods")
        if (s.token_level or s.attention_level):
            if not s.pruning_loc:
                raise MethodError("trilevel.pruning_loc: [] names no block; the token and attention levels need one")
            if s.warmup_epochs >= cfg.epochs:
                raise MethodError(f"trilevel.warmup_epochs: {s.warmup_epochs} >= epochs {cfg.epochs}: the ratios "
                                  "would never leave 1 in training; scale warmup_epochs / decay_epochs to the run")
        if s.dense_warmup and s.example_level and s.tie_break == "cls":
            raise MethodError("trilevel.dense_warmup: cannot be combined with tie_break cls (the tie-break reads the "
                              "CLS attention of the masked blocks, which timm's dense blocks do not keep)")
        needs_cls = s.token_level or s.attention_level or (s.example_level and s.tie_break == "cls")
        why = _has_cls_token(cfg)
        if needs_cls and why:
            raise MethodError(f"model: {cfg.model} with {why} has no CLS token read by the head; Tri-Level ranks "
                              "tokens (and classifies) with the CLS token")

    def token_site(self) -> Optional[TokenSite]:
        if not self.sparse:
            return None
        b = self.section.pruning_loc[0]
        return TokenSite(b + 0.5, what=f"trilevel.pruning_loc {b}: token pruning inside block {b}")

    # --- the model ------------------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> List[nn.Module]:
        if not self.patches:
            return []
        patches = check_vit(model, "trilevel")
        # only the cls tie-break (no token or attention level): the masked blocks for the CLS attention, no pruning
        loc = list(self.section.pruning_loc) if self.sparse else []
        try:
            check_pruning_loc(loc, len(model.blocks))
        except TriLevelConfigError as e:
            raise MethodError(str(e)) from None
        if getattr(model, "cls_token", None) is None or getattr(model, "global_pool", "token") != "token":
            raise MethodError(f"model: {self.cfg.model} has no CLS token read by the head (class_token false or "
                              "global_pool not 'token'); Tri-Level ranks tokens (and classifies) with the CLS token")
        try:
            state = apply_trilevel(model, self.keep_target, self.attn_target, loc,
                                   dense_shortcut=self.section.dense_warmup)
        except TriLevelConfigError as e:
            raise MethodError(str(e)) from None
        state.keep_cls_attn = bool(self.level is not None and self.level.tie_break == "cls_var")
        self.depth = state.depth
        self.dims = ViTDims.of(model)
        self._patched_patches = patches
        return list(iter_prune_ops(model))

    @property
    def states(self) -> list:
        """The shared states of the patched blocks of every model of the run (the trained one, its EMA copy)."""
        if self._states_of is not self.models:
            self._states, self._states_of = [st for m in self.models for st in iter_trilevel(m)], self.models
        return self._states

    @property
    def num_patches(self) -> int:
        return int(num_patches(self.models[0]) or 0 if self.models else 0) or self._patched_patches

    # --- the clock ------------------------------------------------------------------------------------------
    def _set_ratios(self, r: float, a: float) -> None:
        self.ratios = (r, a)
        for st in self.states:
            st.keep_ratio, st.attn_ratio = r, a

    def on_epoch(self, clock: Clock) -> None:
        self.epoch = clock.epoch
        self.presented_this_epoch = self.correct_this_epoch = 0
        if self.sparse:
            self._set_ratios(*self.schedule.at(clock.epoch, 0, clock.iters_per_epoch))

    def on_step(self, clock: Clock) -> None:
        self._set_ratios(*self.schedule.at(clock.epoch, clock.step, clock.iters_per_epoch))

    # --- the data -------------------------------------------------------------------------------------------
    def _seed(self) -> int:
        rank, _ = _dist()
        return self.seed + (rank if self.section.sync == "per_rank" else 0)

    def train_indices(self, epoch: int, dataset_len: int) -> Optional[List[int]]:
        if self.level is None:
            return None
        self.swap_this_epoch = None
        if self.selector is None:
            self.selector = ExampleSelector.from_dataset_size(self.level, dataset_len, seed=self._seed())
            subset = len(self.selector.train_ids)
            if self.level.keep_lowest_n + self.level.remove_n > subset:
                raise MethodError(
                    f"trilevel.remove_n: {self.level.remove_n} (after keep_lowest_n {self.level.keep_lowest_n}) is "
                    f"more than the {subset}-example training subset ({dataset_len} examples less pool_fraction "
                    f"{self.section.pool_fraction}); lower remove_n")
        elif self.selector.capacity != dataset_len:
            raise MethodError(f"trilevel: the checkpoint's example level covers {self.selector.capacity} examples but "
                              f"the training set has {dataset_len}; resume on the same dataset")
        if self.selector.should_swap(epoch):
            self.swap_this_epoch = self.selector.swap(epoch)
        return self.selector.train_ids.tolist()

    def observe(self, batch: ExampleBatch) -> None:
        if self.selector is None:
            return
        correct = batch.logits.argmax(dim=1) == batch.labels.to(batch.logits.device)
        cls_var = None
        if self.level.tie_break == "cls_var":
            cls_attn = self.states[0].cls_attn if self.states else None
            if cls_attn is None:
                raise RuntimeError("trilevel: tie_break cls needs the last block's CLS attention of this step")
            cls_var = cls_attention_variance(cls_attn)
        ids = batch.indices
        _, world = _dist()
        if self.section.sync == "global" and world > 1:
            ids, correct, cls_var = _gather_presentations(ids, correct, cls_var, batch.logits.device, world)
        self.presented_this_epoch += int(correct.numel())
        self.correct_this_epoch += int(correct.sum())
        self.selector.record(ids, correct, cls_var=cls_var)

    # --- reporting ------------------------------------------------------------------------------------------
    def stages(self, keep_ratio: Optional[float] = None) -> List[int]:
        """Patch tokens per stage (entering block 0, then after each pruning location) at ``keep_ratio``."""
        r = self.ratios[0] if keep_ratio is None else keep_ratio
        return list(stage_tokens(self.num_patches, r, self.section.pruning_loc if self.sparse else []))

    def swap_epochs(self) -> List[int]:
        if self.level is None:
            return []
        return swap_epochs(self.epochs, self.level.interval, self.level.max_swaps)

    def plan_state(self, clock: Clock, num_patches: int) -> str:
        """The ratios' phase (warm-up, cosine, targets) and the example level's subset and swaps, for ``--plan``."""
        s, parts = self.section, []
        if self.sparse:
            r, a = self.keep_target, self.attn_target
            if clock.epoch < s.warmup_epochs:
                parts.append("r 1 a 1 (warm-up)")
            elif clock.epoch < s.warmup_epochs + s.decay_epochs:
                parts.append(f"cosine to r {r:g} a {a:g}")
            else:
                parts.append(f"r {r:g} a {a:g}, {' -> '.join(map(str, stage_tokens(num_patches, r, s.pruning_loc)))}")
        if self.level is not None:
            swaps = sum(e <= clock.epoch for e in swap_epochs(clock.epochs, self.level.interval, self.level.max_swaps))
            parts.append(f"{1 - s.pool_fraction:.0%} of the data" + (f", {swaps} swaps made" if swaps else ""))
        return "; ".join(parts)

    def fields(self, scope: str) -> Dict[str, Any]:
        if scope == "run":
            return self._run_fields()
        out: Dict[str, Any] = {}
        if self.sparse:
            out.update(trilevel_keep_ratio=self.ratios[0], trilevel_attn_ratio=self.ratios[1])
            if scope == "epoch":
                out["trilevel_tokens"] = self.stages()
        if self.selector is not None:
            out["trilevel_subset"] = int(len(self.selector.train_ids))
            if scope == "epoch":
                sel, swap = self.selector, self.swap_this_epoch
                out.update(trilevel_pool=int(len(sel.pool_ids)), trilevel_swaps=int(sel.swaps_done),
                           trilevel_swapped=int(len(swap.removed)) if swap else 0,
                           trilevel_restored=int(len(swap.restored)) if swap else 0,
                           trilevel_presented=sel.num_presented,
                           trilevel_train_correct=self.correct_this_epoch / max(self.presented_this_epoch, 1))
        return out

    def _run_fields(self) -> Dict[str, Any]:
        s = self.section
        out: Dict[str, Any] = {"levels": [n for n, on in (("example", s.example_level), ("token", s.token_level),
                                                           ("attention", s.attention_level)) if on]}
        if self.sparse:
            out.update(keep_ratio=self.keep_target, attn_ratio=self.attn_target, pruning_loc=list(s.pruning_loc),
                       tokens_at_target=self.stages(self.keep_target), num_patches=self.num_patches,
                       warmup_epochs=s.warmup_epochs, decay_epochs=s.decay_epochs, eval_dense=s.eval_dense)
        if self.level is not None:
            out.update(swap_epochs=self.swap_epochs(), sync=s.sync, pool_fraction=s.pool_fraction,
                       remove_n=s.remove_n, tie_break=s.tie_break,
                       swaps_done=self.selector.swaps_done if self.selector else 0,
                       subset=int(len(self.selector.train_ids)) if self.selector else None,
                       pool=int(len(self.selector.pool_ids)) if self.selector else None)
        return out

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The example level (the ratios follow from the clock): the selector, and the figures of the epoch in
        progress (presentations, correct ones, the swap made at its start), so that a run stopped inside an epoch
        logs what an uninterrupted one does. ``global``: this process's state (the same on every process; checked);
        ``per_rank``: every process's, gathered, in rank order."""
        if self.selector is None:
            return {}
        _, world = _dist()
        mine = self.selector.state_dict()
        figures = {"epoch": self.epoch, "presented": self.presented_this_epoch, "correct": self.correct_this_epoch,
                   "swap": _swap_state(self.swap_this_epoch)}
        common = {"pool_fraction": float(self.section.pool_fraction)}
        if self.section.sync == "per_rank":
            every = [(mine, figures)]
            if world > 1:
                every = [None] * world
                torch_dist.all_gather_object(every, (mine, figures))
            return {"sync": "per_rank", "world_size": world, "selectors": [e[0] for e in every],
                    "epoch_figures": [e[1] for e in every], **common}
        if world > 1:
            _check_same_everywhere(self.selector)
        return {"sync": "global", "selector": mine, "epoch_figures": figures, **common}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the example level; a checkpoint this run cannot continue is one line (the trainer loads it before
        anything is written, and again at the start of a resumed epoch)."""
        if self.level is None or not state:
            return
        rank, world = _dist()
        sync = state.get("sync")
        if sync != self.section.sync:
            raise MethodError(f"trilevel.sync: the checkpoint was written with sync {sync}, this run uses "
                              f"{self.section.sync}; resume with --trilevel.sync {sync}")
        saved = state.get("pool_fraction")
        if saved is not None and float(saved) != float(self.section.pool_fraction):
            raise MethodError(f"trilevel.pool_fraction: the checkpoint's subset and pool were drawn with "
                              f"pool_fraction {saved:g} before training and cannot be redrawn inside a run; resume "
                              f"with --trilevel.pool_fraction {saved:g} (or start a new run)")
        figures = state.get("epoch_figures")
        if sync == "per_rank":
            if state["world_size"] != world:
                raise MethodError(f"trilevel.sync per_rank: the checkpoint holds the example subsets of "
                                  f"{state['world_size']} processes but this run has {world}; resume on "
                                  f"{state['world_size']} processes (or use sync global)")
            mine = state["selectors"][rank]
            figures = figures[rank] if figures is not None else None
        else:
            mine = state["selector"]
        if self.level.tie_break == "cls_var" and "cls_var_sum" not in mine["stats"]:
            raise MethodError("trilevel.tie_break: the checkpoint's statistics since the last swap hold no CLS-attention "
                              "variances (written with tie_break none); resume with --trilevel.tie_break none")
        sel = ExampleSelector(self.level, [], [], num_examples=int(mine["capacity"]), seed=int(mine["seed"]))
        try:
            sel.load_state_dict(mine)
        except (TriLevelConfigError, ValueError) as e:
            raise MethodError(first_line(e)) from None
        self.selector = sel
        if figures is not None:
            self.presented_this_epoch, self.correct_this_epoch = int(figures["presented"]), int(figures["correct"])
            self.swap_this_epoch = sel.last_swap = _swap_result(figures["swap"])

    # --- evaluation and measurement -------------------------------------------------------------------------
    def variants(self, num_patches: int, epochs: int, iters_per_epoch: int) -> List[Variant]:
        """A few states along the schedule (cosine factor 1 = warm-up, 0.75, 0.5, 0.25, 0 = the targets) whose shares
        reproduce the schedule's FLOPs from cached per-count FLOPs (:mod:`.cost`); the example level is
        :meth:`data_fraction`."""
        fraction = 1.0 - self.section.pool_fraction if self.level is not None else 1.0
        if not self.sparse:
            return [Variant("Tri-Level examples only", 1.0, lambda model: None, num_patches, data_fraction=fraction)]
        s = self.section
        cost = ForwardCost(self.dims, s.pruning_loc) if self.dims is not None else None
        states = representative_states(self.keep_target, self.attn_target, s.warmup_epochs, s.decay_epochs, epochs,
                                       iters_per_epoch, num_patches, s.pruning_loc, cost)
        out = []
        for st in states:
            tag = " warm-up" if st.c == 1.0 else " target" if st.c == 0.0 else ""
            label = f"TL r{st.keep_ratio:.3f} a{st.attn_ratio:.3f}{tag}"

            def apply(model: nn.Module, ratios=(st.keep_ratio, st.attn_ratio)) -> None:
                set_forced(model, ratios)
            out.append(Variant(label, st.share, apply, st.stages[-1], None, st.epoch_shares, data_fraction=fraction))
        if s.eval_dense:
            out.append(Variant("Tri-Level dense evaluation", 0.0, _dense_eval, num_patches, use="eval", key="dense"))
        return out


def _dense_eval(model: nn.Module) -> Callable[[], None]:
    """Evaluate ``model`` on all tokens with dense attention until the returned function undoes it."""
    states = list(iter_trilevel(model))
    before = [st.dense_eval for st in states]
    for st in states:
        st.dense_eval = True

    def undo() -> None:
        for st, b in zip(states, before):
            st.dense_eval = b
    return undo


# ---------------------------------------------------------------------------------------------- collectives
def _gather_presentations(ids: torch.Tensor, correct: torch.Tensor, cls_var: Optional[torch.Tensor],
                          device: torch.device, world: int):
    """Every process's ``(ids, correct, cls_var)`` of this step, concatenated in rank order (one all_gather)."""
    cols = [ids.to(device=device, dtype=torch.float64), correct.to(device=device, dtype=torch.float64)]
    if cls_var is not None:
        cols.append(cls_var.to(device=device, dtype=torch.float64))
    packed = torch.stack(cols, dim=1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(world)]
    torch_dist.all_gather(parts, packed)
    every = torch.cat(parts).cpu()
    return (every[:, 0].to(torch.int64), every[:, 1] > 0.5, every[:, 2] if cls_var is not None else None)


def _check_same_everywhere(selector: ExampleSelector) -> None:
    """``sync: global`` keeps one subset on every process; a cheap fingerprint proves it at every checkpoint."""
    _, world = _dist()

    def mix(ids: np.ndarray) -> int:          # order-sensitive (the pool's order decides the next draw)
        return int((ids * np.arange(1, ids.size + 1) % 1_000_003).sum())
    train, pool = selector.train_ids, selector.pool_ids
    mine = torch.tensor([train.size, pool.size, mix(np.sort(train)), mix(pool), selector.swaps_done,
                         selector.num_presented, mix(selector.presented_ids())], dtype=torch.int64, device=_device())
    every = [torch.empty_like(mine) for _ in range(world)]
    torch_dist.all_gather(every, mine)
    if any(not torch.equal(e, every[0]) for e in every):
        raise RuntimeError(f"trilevel (sync global): the processes hold different example subsets or statistics "
                           f"({[e.tolist() for e in every]})")


# ---------------------------------------------------------------------------------------------- checkpoint helpers
def _swap_state(swap: Optional[SwapResult]) -> Optional[Dict[str, Any]]:
    """A swap as plain data and tensors (``weights_only``; int32 below 2**31, as the selector stores ids)."""
    if swap is None:
        return None

    def packed(values) -> torch.Tensor:
        a = np.asarray(values, dtype=np.int64)
        return torch.from_numpy(a.astype(np.int32) if a.size == 0 or a.max() < 2 ** 31 else a)
    return {"epoch": -1 if swap.epoch is None else int(swap.epoch),
            **{k: packed(getattr(swap, k)) for k in ("removed", "restored", "dropped", "removed_counts")}}


def _swap_result(state: Optional[Dict[str, Any]]) -> Optional[SwapResult]:
    if state is None:
        return None
    return SwapResult(None if state["epoch"] < 0 else int(state["epoch"]),
                      *(state[k].numpy().astype(np.int64) for k in ("removed", "restored", "dropped", "removed_counts")))
