"""sora_train: pretraining video diffusion transformers over packed spacetime patches."""

from pathlib import Path

# conf/ sits at the repository root (users edit it); entries find it from here.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
