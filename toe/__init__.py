"""Token Expansion (ToE, CVPR 2024) for timm Vision Transformers.

    from toe import ToESchedule, apply_toe, set_epoch
    apply_toe(model, ToESchedule(expansion_steps=(0, 100, 200), keep_rates=(0.5, 0.75, 1.0), init_keep_rate=0.25))
    set_epoch(model, epoch)          # once per epoch; model.train() turns it on, model.eval() off
"""
from .ops import token_expansion
from .patch import (TokenExpansion, apply_toe, find_toe, iter_toe, remove_toe, set_epoch,
                    set_sparse_eval)
from .schedule import DISTANCES, ScheduleError, ToESchedule

__all__ = ["ToESchedule", "ScheduleError", "DISTANCES", "TokenExpansion", "token_expansion", "apply_toe",
           "remove_toe", "find_toe", "iter_toe", "set_epoch", "set_sparse_eval"]
