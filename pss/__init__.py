"""Patch Sampling Schedule (PSS, McDanel & Huynh 2022) for timm Vision Transformers: the operator core.

    import pss                                     # also registers pss_deit_small_patch16_224/384, pss_vit_base_patch16_224
    schedule = pss.PSSSchedule("cyclic", 0.8, -0.1, epochs=300, iterations_per_epoch=1251, cooldown_epochs=10)
    sampler = pss.apply_sampler(model, "magnitude")   # pre-hook on model.blocks[0], attached as model.pss
    sampler.set_drop_ratio(schedule.drop_ratio(epoch * iterations_per_epoch + step))   # every iteration
    model.train()                                  # samples in training; model.eval() runs on all patches
"""
from .models import (PositionalRelPosAttention, PSSBeit, follow_positions, from_published_state_dict,
                     from_simmim_pretraining, relative_position_bias)
from .ops import (SAMPLERS, PatchSampler, apply_sampler, find_sampler, gather_tokens, iter_samplers,
                  remove_sampler, sample_patches, select_patches, set_drop_ratio)
from .schedule import SCHEDULERS, PSSSchedule, ScheduleError, num_kept_patches, snap

__all__ = ["PSSSchedule", "ScheduleError", "SCHEDULERS", "num_kept_patches", "snap", "SAMPLERS", "PatchSampler",
           "sample_patches", "select_patches", "gather_tokens", "apply_sampler", "remove_sampler", "find_sampler",
           "iter_samplers", "set_drop_ratio", "PositionalRelPosAttention", "relative_position_bias",
           "follow_positions", "from_published_state_dict", "from_simmim_pretraining", "PSSBeit"]
