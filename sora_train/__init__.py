"""sora_train: pretraining video diffusion transformers over packed spacetime patches."""

from pathlib import Path

# conf/ sits at the repository root (users edit it); a wheel carries it as sora_train/conf (pyproject.toml).
_REPO_CONF = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = str(_REPO_CONF if (_REPO_CONF / "train.yaml").exists() else Path(__file__).resolve().parent / "conf")
