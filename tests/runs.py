"""Small readers of a run directory, shared by the end-to-end tests."""
import json
import os

import torch


def read_log(out):
    """The epoch records of ``out/log.jsonl``."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(path):
    """A checkpoint, loaded as the trainer does (weights only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
