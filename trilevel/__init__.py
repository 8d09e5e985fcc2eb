"""Tri-Level E-ViT (Kong et al., AAAI 2023, "Peeling the Onion") for timm Vision Transformers.

Three levels of sparsity in training: examples (:mod:`.examples`: a forgetting-based swap of the training subset),
tokens and attention connections (:mod:`.ops`, patched into the model by :mod:`.patch`), on the ratio schedule of
:mod:`.schedule`::

    from trilevel import RatioSchedule, apply_trilevel, set_ratios
    schedule = RatioSchedule(keep_ratio=0.7, attn_ratio=0.3)
    apply_trilevel(model, *schedule.targets)                     # evaluation runs at the targets
    set_ratios(model, *schedule.at(epoch, step, iters_per_epoch))  # before every training iteration
"""
from .examples import (ExampleLevel, ExampleSelector, ForgettingStats, SwapResult, cls_attention_variance,
                       forgetting_counts, forgetting_statistics, presentation_stats, random_split, removal_order,
                       swap_epochs, swap_subsets)
from .ops import (MaskedAttention, TokenCounts, cls_attention, connection_mask, masked_attention,
                  masked_attention_reference, num_kept, patch_attention, prune_tokens, token_counts)
from .patch import (TriLevelBlock, TriLevelPrune, TriLevelState, apply_trilevel, find_trilevel, iter_prune_ops,
                    iter_trilevel, remove_trilevel, set_dense_eval, set_enabled, set_forced, set_ratios)
from .schedule import (KeepSchedule, RatioSchedule, TriLevelConfigError, check_count, check_pruning_loc, check_ratio,
                       keep_rate)

__all__ = [
    "ExampleLevel", "ExampleSelector", "ForgettingStats", "SwapResult", "cls_attention_variance", "forgetting_counts",
    "forgetting_statistics", "presentation_stats", "random_split", "removal_order", "swap_epochs", "swap_subsets",
    "MaskedAttention", "TokenCounts", "cls_attention", "connection_mask", "masked_attention",
    "masked_attention_reference", "num_kept", "patch_attention", "prune_tokens", "token_counts",
    "TriLevelBlock", "TriLevelPrune", "TriLevelState", "apply_trilevel", "find_trilevel", "iter_prune_ops",
    "iter_trilevel", "remove_trilevel", "set_dense_eval", "set_enabled", "set_forced", "set_ratios",
    "KeepSchedule", "RatioSchedule", "TriLevelConfigError", "check_count", "check_pruning_loc", "check_ratio",
    "keep_rate",
]
