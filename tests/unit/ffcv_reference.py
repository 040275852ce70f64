"""FFCV's own formulas (libffcv/ffcv-imagenet train_imagenet.py), to check our recipes against."""

import numpy as np


def ffcv_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """FFCV's ImageNetTrainer.get_resolution."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32
