import os
import sys
import warnings

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
