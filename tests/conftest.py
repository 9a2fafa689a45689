import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# for the processes started from here (the pytest-xdist workers, the tools the tests run): glibc keeps freed memory
# for the next allocation instead of unmapping and faulting in fresh zeroed pages for every large activation, which
# took a tenth of the time of a forward at 224 px. Allocation only: no number a test checks depends on it
for _name, _value in (("MALLOC_MMAP_THRESHOLD_", 2 ** 25), ("MALLOC_TRIM_THRESHOLD_", 2 ** 32),
                      ("MALLOC_TOP_PAD_", 2 ** 29)):
    os.environ.setdefault(_name, str(_value))


def _threads_per_xdist_worker():
    """Under pytest-xdist (``-n`` in setup.cfg): the cores shared out among the workers, at least one each, so that
    two workers on two cores do not each start two intra-op threads and stall one another; None otherwise."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


_THREADS = _threads_per_xdist_worker()
if _THREADS is not None:  # before torch is imported; the processes the tests start inherit it
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_THREADS)
    # a test that asks for more threads than its share (numbers computed with 2) must not spin-wait for a thread
    # the other worker holds the core of: OpenMP's waiting threads sleep instead
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

if _THREADS is not None:
    import torch

    torch.set_num_threads(_THREADS)


@pytest.fixture(autouse=True)
def _seed():
    import torch  # here, not at the top: the xdist controller, which runs no test, starts its workers sooner

    torch.manual_seed(0)
    yield


# module- or session-wide runs that several tests read: the tests using one go to the same xdist worker
# (--dist loadgroup), which then makes it once
SHARED_RUNS = ("trained_run", "resnet_run", "seg_run", "distill_teacher", "stop_reference", "formats")


def _schedule_rank(item) -> int:
    """Longest work first: tests marked slow, then the groups sharing a run, then the other tool runs (a process
    or a training each), then the rest, which fill in the last minutes evenly."""
    if item.get_closest_marker("slow"):
        return 0
    if any(name in SHARED_RUNS for name in getattr(item, "fixturenames", ())):
        return 1
    return 2 if item.nodeid.startswith("tests/tools/") else 3


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under xdist (--dist loadgroup --no-loadscope-reorder: handed out one test or group at a time, in this order):
    the longest work first, so that the two workers finish together instead of one waiting for the other's last
    long test; the users of a shared training run grouped on one worker."""
    if _THREADS is None:
        return
    items.sort(key=_schedule_rank)  # stable: in collection order within a rank
    for item in items:
        for name in SHARED_RUNS:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(name))
