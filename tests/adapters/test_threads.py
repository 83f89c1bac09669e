"""Torch's intra-op threads inside daskpatch's tasks: dask threads x torch threads fit the cores
unless the user chose them. Each case runs in a fresh process: torch keeps its thread numbers
per process (and per thread), so one case would leak into the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import dask
import dask.system
import pytest

from daskpatch.adapters.threads import available_cores, dask_threads, thread_plan

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = """
import json, threading
import numpy as np, torch, dask
import daskpatch as dp
{before}
import builtins
builtins._daskpatch_seen = set()
class Net(torch.nn.Module):  # pickled by value on a cluster: it reports through builtins
    def forward(self, x):
        import builtins
        assert threading.current_thread() is not threading.main_thread()
        builtins._daskpatch_seen.add(torch.get_num_threads())
        return x
main = torch.get_num_threads()
vol = np.zeros((1, 24, 24, 24), np.float32)
with dask.config.set({config}):
    res = dp.apply_patches(vol, Net(), 12, 6, channel_axis=0, block_shape=12)
    out = {run}(res)
print(json.dumps({{"seen": sorted(builtins._daskpatch_seen), "main_before": main,
                   "main_after": torch.get_num_threads()}}))
"""


def _run(config: dict, before: str = "", env: dict | None = None,
         run: str = "dask.compute") -> dict:
    code = SCRIPT.format(before=textwrap.dedent(before), config=repr(config), run=run)
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    full["PYTHONPATH"] = ROOT + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env or {})
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


CORES = max(1, int(dask.system.cpu_count()))


@pytest.mark.parametrize("workers", [1, 2])
def test_threaded_scheduler_fits_torch_threads_to_the_cores(workers):
    got = _run({"num_workers": workers})  # blocks in parallel: each thread gets its share
    assert got["seen"] == [max(1, CORES // workers)]
    assert got["main_after"] == got["main_before"]  # the caller's own thread is left alone


def test_to_numpy_runs_one_model_call_at_a_time_with_every_core():
    got = _run({"num_workers": 2}, run="dp.to_numpy")  # its blocks run one after another
    assert got["seen"] == [CORES]


def test_a_user_set_value_is_left_alone():
    got = _run({"num_workers": 2}, before="torch.set_num_threads(3)")
    assert got["seen"] == [3]


def test_omp_num_threads_is_left_alone():
    if CORES < 2:
        pytest.skip("auto gives 1 torch thread on 1 core too")
    got = _run({"num_workers": 1}, env={"OMP_NUM_THREADS": "1"})  # as distributed's nanny sets
    assert got["seen"] == [1]


def test_the_setting_overrides():
    got = _run({"num_workers": 2, "daskpatch.torch-threads": 3})
    assert got["seen"] == [3]


def test_a_distributed_worker_uses_its_nthreads():
    pytest.importorskip("distributed")
    before = """
        from distributed import Client, LocalCluster
        cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                               dashboard_address=None)
        client = Client(cluster)
    """
    got = _run({"num_workers": 1}, before=before)  # the worker's 2 threads count, not this
    assert got["seen"] == [max(1, CORES // 2)]


def test_plan_and_bad_setting():
    assert available_cores() == CORES
    with dask.config.set(num_workers=3):
        assert dask_threads() == 3
    plan = thread_plan(threads=1)
    assert plan["cores"] == CORES and plan["dask_threads"] == 1
    with dask.config.set({"daskpatch.torch-threads": 0}):
        with pytest.raises(ValueError, match=r"daskpatch.torch-threads must be 'auto' or an "
                                             r"integer >= 1; got 0"):
            thread_plan(threads=1)
