import os

import pytest

# Two cores: keep torch from oversubscribing them when tests spawn processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Set EPD_TEST_DEVICE=cuda to run the engine tests (and their transformers references) on a GPU.
TEST_DEVICE = os.environ.get("EPD_TEST_DEVICE", "cpu")

FAMILIES = ("llama", "qwen2", "qwen3", "llava", "qwen2_5_vl")
VLM_FAMILIES = ("llava", "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> directory of the tiny model, built once per session."""
    from stages.models.make_model import make_model

    root = tmp_path_factory.mktemp("models")
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = str(make_model(family, "tiny", root / family, seed=0))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def llava_dir(tiny_models):
    """The tiny LLaVA every end-to-end deployment serves."""
    return tiny_models("llava")


@pytest.fixture(scope="session")
def test_images():
    """Random RGB images of different sizes (deterministic)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1234)
    sizes = [(60, 80), (100, 50), (120, 120), (40, 90), (88, 66)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def make_llm(model_dir: str, **engine_args):
    """An ``LLM`` on the test device, in float32 like the transformers reference."""
    from stages.engine import LLM

    engine_args.setdefault("dtype", "float32")  # "auto" would pick bfloat16 on a GPU
    return LLM(model_dir, device=TEST_DEVICE, **engine_args)


# ucxx (1.21 / 0.52) can crash in the interpreter's last garbage collection when a pull timed
# out on an endpoint whose receives were still posted (the UCX worker is gone by then). The
# tests have all run and reported by ``pytest_unconfigure``: leave without that collection, with
# pytest's own exit status. Workers do the same on exit (stages/worker.py).
_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


def pytest_unconfigure(config):
    import sys

    if "ucxx" in sys.modules and _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])
