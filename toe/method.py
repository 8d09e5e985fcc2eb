"""Token Expansion as a method plug-in: the ``toe:`` config section and its hooks into the trainer.

ToE changes by epoch (its stages), reduces tokens once, at the input of ``insert_block``, and needs the full patch
grid there (its seeds are raster positions). It has no state of its own beyond the epoch, so checkpoints carry
nothing for it. Evaluation runs on all tokens unless ``sparse_eval``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from torch import nn

from methods import Clock, Method, MethodError, TokenSite, Variant, register_method
from models import check_vit, num_patches

from .patch import DISTANCE_MODES, apply_toe, iter_toe
from .schedule import DISTANCES, EXPANSIONS, INITS, MERGES, ScheduleError, ToESchedule


@dataclass
class ToEConfig:
    """Token Expansion. Stage s runs from ``expansion_steps[s-1]`` and keeps ``keep_rates[s-1]`` of the patch tokens."""
    expansion_steps: List[int] = field(default_factory=lambda: [0, 100, 200])   # the epoch each stage starts at
    keep_rates: List[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])  # patch tokens kept per stage (1: all)
    init_keep_rate: float = 0.25        # the seeds: the share of the patch tokens picked on a grid before expanding
    repeat_k: int = 2                   # the expansion steps that grow the seeds to the stage's keep rate
    distance: str = field(default="cosine", metadata={"choices": DISTANCES})
    # published: the authors' max-score rule for every distance; nearest: min distance for manhattan/euclidean
    distance_mode: str = field(default="published", metadata={"choices": DISTANCE_MODES})
    # ToE runs on the input of this block, i.e. after block insert_block - 1 (1 = after the first block)
    insert_block: int = 1
    # also reduce tokens in evaluation (the paper evaluates on all tokens)
    sparse_eval: bool = False
    # --- pipeline ablations (the first choice of each is the published method; toe.ops.select_tokens_ablation).
    # Each keeps the published token count per stage, so an ablation changes which tokens are kept, not the speed-up.
    # seeds: grid = the published raster-stride positions; random = a uniform random subset per image
    init: str = field(default="grid", metadata={"choices": INITS})
    # farthest = the published farthest-first expansion; random = a random subset of the other tokens per image;
    # none = no expansion step: the seed rule alone picks every kept token (grid: spread evenly over the grid)
    expansion: str = field(default="farthest", metadata={"choices": EXPANSIONS})
    # mean = every unselected token averaged into its closest kept token (published); drop = discarded
    merge: str = field(default="mean", metadata={"choices": MERGES})

    def schedule(self) -> ToESchedule:
        return ToESchedule(tuple(self.expansion_steps), tuple(self.keep_rates), self.init_keep_rate,
                           self.repeat_k, self.distance, self.init, self.expansion, self.merge)


@register_method
class ToE(Method):
    name = "toe"
    label = "ToE"
    Config = ToEConfig

    def __init__(self, section: ToEConfig, cfg: Any):
        super().__init__(section, cfg)
        self.schedule = section.schedule()
        self.epochs = cfg.epochs
        self.stage = self.schedule.stage(0)
        self.ops: list = []

    @classmethod
    def validate(cls, section: ToEConfig, cfg: Any) -> None:
        try:
            section.schedule()
        except ScheduleError as e:
            raise MethodError(str(e)) from None
        last = section.expansion_steps[-1]
        if last >= cfg.epochs:
            raise MethodError(f"toe.expansion_steps: stage {len(section.expansion_steps)} starts at epoch {last} but "
                              f"epochs is {cfg.epochs}: scale the steps to the run length")
        if section.insert_block < 0:
            raise MethodError(f"toe.insert_block: {section.insert_block} must be >= 0")

    def token_site(self) -> TokenSite:
        b = self.section.insert_block
        return TokenSite(float(b), needs_full_grid=True, what=f"toe.insert_block {b}: ToE at the input of block {b}")

    # --- the model ------------------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> List[nn.Module]:
        patches, blocks = check_vit(model, "toe"), model.blocks
        b = self.section.insert_block
        if b >= len(blocks):
            raise MethodError(f"toe.insert_block: {b} is outside 0..{len(blocks) - 1} for a {len(blocks)}-block model")
        for stage in range(1, self.schedule.num_stages + 1):
            if self.schedule.is_reducing(stage) and self.schedule.kept_tokens(patches, stage) < 1:
                raise MethodError(f"toe.keep_rates: stage {stage} keeps 0 of {patches} patch tokens; raise "
                                  f"toe.keep_rates / toe.init_keep_rate or use a larger input_size")
        apply_toe(model, self.schedule, insert_block=int(self.token_site().site),
                  sparse_eval=self.section.sparse_eval, distance_mode=self.section.distance_mode)
        return list(iter_toe(model))

    @property
    def num_patches(self) -> int:
        """Patch tokens of the trained model now (a curriculum may change its input size between epochs)."""
        return int(num_patches(self.models[0]) or 0) if self.models else 0

    # --- the clock ------------------------------------------------------------------------------------------
    def on_epoch(self, clock: Clock) -> None:
        self.stage = self.schedule.stage(clock.epoch)
        for op in self.ops:
            op.set_epoch(clock.epoch)

    # --- reporting ------------------------------------------------------------------------------------------
    @property
    def kept(self) -> int:
        return self.schedule.kept_tokens(self.num_patches, self.stage)

    def per_stage(self) -> Dict[int, int]:
        """Patch tokens kept in each stage this run reaches, e.g. ``{1: 98, 2: 147, 3: 196}``."""
        return {stage: self.schedule.kept_tokens(self.num_patches, stage)
                for stage, _, _ in self.schedule.stage_epochs(self.epochs)}

    def fields(self, scope: str) -> Dict[str, Any]:
        if scope == "run":
            out: Dict[str, Any] = {"kept_tokens_per_stage": self.per_stage(), "num_patches": self.num_patches}
            return {**out, **{f"ablation_{k}": v for k, v in self.schedule.ablations.items()}}
        return {"toe_stage": self.stage, "toe_kept_tokens": self.kept}      # the stage is the epoch's

    def plan_state(self, clock: Clock, num_patches: int) -> str:
        stage = self.schedule.stage(clock.epoch)
        return f"stage {stage}, {self.schedule.kept_tokens(num_patches, stage)}/{num_patches} tokens"

    # --- measurement ----------------------------------------------------------------------------------------
    def variants(self, num_patches: int, epochs: int, iters_per_epoch: int) -> List[Variant]:
        out = []
        for stage, first, last in self.schedule.stage_epochs(epochs):
            def apply(model: nn.Module, stage: int = stage) -> None:
                for op in iter_toe(model):
                    op.stage, op.sparse_eval = stage, True
            out.append(Variant(f"ToE stage {stage}", (last - first) / epochs, apply,
                               self.schedule.kept_tokens(num_patches, stage), (first, last)))
        return out
