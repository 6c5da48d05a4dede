"""Fixtures of the source conformance suite: long-lived servers, one bed per source."""

from __future__ import annotations

import pytest

from .beds import HOSTILE, FileBed, HfBed, HttpBed, S3Bed

BEDS = {"file": FileBed, "http": HttpBed, "s3": S3Bed, "s3-versioned": S3Bed, "hf": HfBed, "hf-dataset": HfBed}


def pytest_generate_tests(metafunc):
    """Run each test on the beds that can express what it tries, and only on those.

    A file name with a NUL cannot exist on a filesystem and the http source
    sends no credentials: such pairs are not generated rather than skipped.
    """
    if "bed" not in metafunc.fixturenames:
        return
    if "hostile_kind" in metafunc.fixturenames:
        pairs = [(b, k) for b, cls in BEDS.items() for k in sorted(HOSTILE) if k in cls.hostile_names]
        metafunc.parametrize(("bed", "hostile_kind"), pairs, indirect=["bed"])
        return
    need = getattr(metafunc.function, "needs", None)
    metafunc.parametrize("bed", [b for b, cls in BEDS.items() if need is None or getattr(cls, need)],
                         indirect=True)


@pytest.fixture
def bed(request, tmp_path, origin_factory, s3_server, s3_proxy, hub, source_env):
    kind = request.param
    if kind == "file":
        return FileBed(tmp_path / "files")
    if kind == "http":
        return HttpBed(tmp_path / "www", origin_factory)
    if kind.startswith("s3"):
        return S3Bed(s3_server, s3_proxy, versioned=kind == "s3-versioned")
    return HfBed(hub, repo_type="dataset" if kind == "hf-dataset" else "model")
