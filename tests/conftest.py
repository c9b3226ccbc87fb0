import logging
import os
import warnings

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("sora_train.data.stream").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A small synthetic dataset encoded with the pixel codec: 48 clips in 6 shards."""
    from data_tools.encode import EncodePolicy, run
    from data_tools.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    captions = generate(root / "raw", 48, seed=1, min_size=32, max_size=64, min_frames=4, max_frames=12)
    policy = EncodePolicy(patch_size=(1, 2, 2), max_pixels=48 * 48, max_frames=8)
    # SORA_TEST_TEXT_ENCODER: a local HF encoder of width 384 instead of MiniLM (launch/gpu_check.sh makes a tiny
    # random one where the MiniLM package is not installed).
    run(str(captions), str(root / "shards"), {"kind": "pixel", "factors": (1, 4, 4)},
        os.environ.get("SORA_TEST_TEXT_ENCODER"), policy, clips_per_shard=8, progress=False)
    return root


@pytest.fixture(scope="session")
def metric_networks(tmp_path_factory):
    """Tiny random FVD (I3D TorchScript), FID (ViT) and CLIP networks: a MetricsConfig's *_network keys."""
    import feature_nets

    return feature_nets.networks(tmp_path_factory.mktemp("networks"))


def training_metrics(networks: dict, shards) -> dict:
    """straight_run's logging.metrics: 6 held-out clips in batches of 2 (test_metrics.py compares it with sora-eval)."""
    return {**networks, "real": str(shards), "clips": 6, "batch": 2}


@pytest.fixture(scope="session")
def straight_run(dataset, metric_networks, tmp_path_factory):
    """10 steps of RESUMABLE without interruption, measuring FVD/FID/CLIPScore at steps 5 and 10 (the runs that
    must match it do not: the measurement leaves training as it was); returns its out_dir."""
    from distributed import RESUMABLE, tiny_model, torchrun

    out = tmp_path_factory.mktemp("straight") / "run"
    metrics = {f"logging.metrics.{k}": v for k, v in training_metrics(metric_networks, dataset / "shards").items()}
    torchrun(2, ["-m", "sora_train.train", *tiny_model(dataset / "shards", out, **RESUMABLE, **{"optim.steps": 10},
                                                       **{"logging.metrics_every": 5}, **metrics)])
    return out


# torch.compile's backend for the tests of what dynamo and AOTAutograd make of the model (graphs, breaks,
# recompiles, what a block keeps for backward): inductor's decompositions and its min-cut partitioner, with eager
# kernels instead of generated C++, which an empty cache spends ~80% of such a test compiling on 2 cores (routed
# spans: 11 s vs 57 s). The generated code itself is tested where it is what runs: the compiled ZeRO-3 run
# (tests/test_distributed.py) and compiled Muon (the quickstart's path).
GRAPH_BACKEND = "aot_eager_decomp_partition"


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run where CUDA is (launch/gpu_check.sh runs `pytest -m gpu`); elsewhere they are skipped."""
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run with -m gpu: launch/gpu_check.sh)")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))  # tests/distributed.py helpers
