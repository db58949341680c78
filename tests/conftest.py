import os
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=DeprecationWarning)


def _share_cores_between_workers() -> None:
    """Give each pytest-xdist worker its share of the cores, not all of them.

    torch's intra-op pool starts one thread per core in every process, so with `-n auto` each worker (and every
    subprocess it starts) runs as many threads as there are cores: 2 workers on 2 cores ran 4 busy threads, and
    their spin-waiting cost 2.6x the CPU time of 1 thread each (tests/methods + tests/merging: 82 s of user time
    against 31 s). The environment variable covers torch not yet imported and the subprocesses; set_num_threads
    covers a torch a plugin imported first.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if "PYTEST_XDIST_WORKER" not in os.environ or workers < 2:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_cores_between_workers()


# The files that take longest, longest first (seconds of one worker's time with `-n auto` on 2 cores, measured
# 2026-12-08: the page's journey ~85, FSDP's 3 torchrun launches ~60, then 13-25 each). Their files start first, so
# that none of them is left running alone at the end of the suite while the other worker idles; every other file
# keeps its place.
SLOW_FILES_FIRST = ("tests/ui/test_page.py", "tests/train/test_fsdp.py", "tests/io/test_llama_cpp_converters.py",
                    "tests/cli/test_cli_core.py", "tests/train/test_grpo_deepspeed.py", "tests/io/test_output_policy.py",
                    "tests/cli/test_cli_manners.py", "tests/train/test_distributed.py",
                    "tests/train/test_train_methods.py", "tests/ui/test_server.py")


def pytest_collection_modifyitems(items: list) -> None:
    """Order the files: SLOW_FILES_FIRST, then the rest as collected (a stable sort: each file's tests stay together
    and in order). The order is the same in every pytest-xdist worker, as xdist requires."""
    rank = {path: i for i, path in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `-n` with xdist's default `--dist load`, hand each worker whole files, in the order above (xdist's loadfile, without
    its reordering by test count). A file's module fixtures (a torchrun launch, a server, a browser) are then built
    once instead of once per worker that gets one of its tests, and the long files start first. Any other `--dist`
    is left to xdist."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)
