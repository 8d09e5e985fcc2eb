"""EfficientTrain v1 (Wang et al., ICCV 2023) as a curriculum plug-in: phases of the run that train on
low-frequency crops of the images (a smaller input size) with weaker RandAugment and a larger per-process batch.

    from efficienttrain import low_frequency_crop
    small = low_frequency_crop(images, 160)      # [B, C, 224, 224] -> [B, C, 160, 160], the lowest frequencies
"""
from .ops import low_frequency_crop

__all__ = ["low_frequency_crop"]
