"""Shared test settings: reproducible hypothesis runs, a busy thread switcher and
short temporary directories for pytest-xdist's workers."""

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Derandomized and database-free: every run draws the same examples, so a
# failure seen once is seen again. ISC_HYPOTHESIS_PROFILE=thorough explores
# more (still reproducible) for a longer local run.
settings.register_profile(
    "isc",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("isc"), max_examples=2000)
settings.load_profile(os.environ.get("ISC_HYPOTHESIS_PROFILE", "isc"))


@pytest.hookimpl(tryfirst=True)  # before pytest's own, which reads the basetemp
def pytest_configure(config):
    # pytest-xdist runs each worker in BASETEMP/popen-gwN; make it BASETEMP/N,
    # so the tmp_path of a worker is 2 characters longer than the serial one,
    # not 10: the Unix sockets tests bind under tmp_path stay within the
    # 108 bytes of sun_path (pytest still removes BASETEMP with old runs).
    worker = getattr(config, "workerinput", None)
    if worker is not None and config.option.basetemp:
        basetemp = Path(config.option.basetemp)
        config.option.basetemp = str(basetemp.with_name(worker["workerid"].removeprefix("gw")))
    config.addinivalue_line(
        "markers",
        "big: a bitmap of billions of chunks, cheap only while its memory stays untouched",
    )


@pytest.fixture(scope="session")
def credentials(tmp_path_factory):
    """X.509 credentials directories made with openssl, by name (tests/certs.py)."""
    from certs import make_credentials

    return make_credentials(tmp_path_factory.mktemp("credentials"))


@pytest.fixture
def busy_switching():
    """Make the interpreter switch threads every few microseconds, so races show up."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    """A single-node Ceph cluster (tests/ceph.py), started once for the whole run.

    Skips, naming the Debian packages, where the Ceph or QEMU tools or QEMU's
    rbd driver are missing.
    """
    import subprocess

    from ceph import Cluster, missing

    why = missing()
    if why is not None:
        pytest.skip(why)
    with Cluster(tmp_path_factory.mktemp("ceph")) as cluster:
        cluster.create_image("probe", 1 << 20)
        probe = subprocess.run(
            ["qemu-img", "info", cluster.qemu_uri("probe")], capture_output=True, text=True
        )
        if probe.returncode:
            pytest.skip(
                "QEMU cannot open RBD images (install Debian's qemu-block-extra): "
                + probe.stderr.strip()
            )
        yield cluster
