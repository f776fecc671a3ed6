"""Shared fixtures: tiny random DINOv2-style encoder, tiny model config, fake datasets in real layouts."""

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, str(Path(__file__).parent))

from fixtures_ckpt import *  # noqa: E402,F401,F403  (a trained smoke checkpoint, once per session)
from fixtures_data import *  # noqa: E402,F401,F403  (dataset layouts)
from fixtures_export import *  # noqa: E402,F401,F403  (the smoke checkpoint exported once; mixed images)
from fixtures_model import *  # noqa: E402,F401,F403  (tiny encoder and model)
