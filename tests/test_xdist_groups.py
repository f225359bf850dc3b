"""The test run's own machinery: pytest-xdist's `--dist loadgroup` (pyproject's addopts)
must keep each `xdist_group` on one worker. The SLURM tests share one cluster and the
multi-process tests one reference run through that; with pytest 9, xdist 3.8 silently
stopped grouping (it names a group by `item._nodeid`, which pytest 9 no longer reads), and
two SLURM clusters ran at once in CI and mixed up their jobs' coordinators."""

import os

import pytest


@pytest.mark.xdist_group("probe")
def test_xdist_groups_hold(request):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not run by pytest-xdist")
    # loadgroup schedules by the "@group" suffix it gives a grouped test's node id.
    assert request.node.nodeid.endswith("@probe"), (
        f"{request.node.nodeid}: xdist_group is not applied; pin pytest below 9 "
        "(constraints.txt) or a pytest-xdist that supports it"
    )
