import os

import pytest

# Two threads keep tests from fighting over the cores when pytest runs beside other work.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A packed dataset of 6 generated classes, 12 images each, 64 px."""
    from toolkit.config import PackConfig
    from toolkit.pack import run_pack
    from toolkit.synthetic import write_image_folder

    root = tmp_path_factory.mktemp("tiny")
    images = write_image_folder(root / "images", num_classes=6, images_per_class=12, size=64)
    config = PackConfig(val_fraction=0.2, test_fraction=0.2, shard_max_samples=16, workers=1)
    run_pack(images, root / "dataset", config)
    return root / "dataset"
