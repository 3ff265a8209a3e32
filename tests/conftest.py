"""Shared test setup: environment for the oracles, hypothesis profiles, GPU marker.

Profiles (select with HYPOTHESIS_PROFILE=dev|ci, default dev):
  dev  few examples, for quick local iteration
  ci   more examples, derandomized so a CI run is reproducible; used by .ci/run
"""

import os

# bitsandbytes' CPU dequantize goes through torch.compile, which compiles C++ for every new
# shape (about a second each); eager gives bit-identical results in a fraction of the time.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# Triton kernels run under the interpreter on machines without a GPU.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# train.py probes the step time before it starts (minilora/train/steptime.py): seconds per run that
# the tests of other things do not need; tests/test_step_time.py turns it back on.
os.environ.setdefault("MINILORA_STEP_PROBE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "dev",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# One thread: the tests use small tensors, where OpenMP fork/join costs more than it saves
# (and stalls badly when another process holds a core).
torch.set_num_threads(int(os.environ.get("MINILORA_TEST_THREADS", "1")))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's worker reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    # pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml) hands tests to the workers one by one; a
    # module- or session-scoped fixture (a trained run folder, say) would then be built once per worker.
    # The tests of a module that use one go to a single worker together, so it is built once.
    for item in items:
        fixturedefs = getattr(item, "_fixtureinfo", None)
        if fixturedefs is None:
            continue
        shared = any(
            d.scope in ("module", "package", "session") and d.baseid  # baseid "": pytest's own (tmp_path_factory)
            for defs in fixturedefs.name2fixturedefs.values()
            for d in defs
        )
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
