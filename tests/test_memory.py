"""dpcnn keeps the memory a step frees for the next one (dpcnn.memory): no page faults per step."""

import subprocess
import sys

import pytest

from conftest import REPO

STEPS = r"""
import resource, numpy as np, dpcnn
def step():
    temporaries = [np.ones(1 << 18, np.float32) for _ in range(6)]  # six 1 MB arrays alive at once
    del temporaries
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(dpcnn.MALLOC_TUNED, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(env_malloc):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    if env_malloc:
        env["DPCNN_MALLOC"] = env_malloc
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True)
    tuned, count = out.stdout.split()
    return tuned == "True", int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_importing_dpcnn_stops_the_steps_temporaries_from_faulting_in_fresh_pages():
    tuned, count = faults(None)
    assert tuned and count < 500, count  # 50 steps x 6 MB would be ~75,000 faults if each were mapped anew
    untouched, default_count = faults("default")  # the opt-out leaves glibc as it was
    assert not untouched and not faults("off")[0]
    assert default_count > 10 * max(count, 100), (count, default_count)  # (this test can tell the two apart)
