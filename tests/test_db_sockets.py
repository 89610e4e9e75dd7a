"""``pgferry.db.sockets``: waiting on descriptors past select()'s limit of 1024 (a server with thousands of clients).

The replication reader and the sync server's COPY reader wait on PostgreSQL sockets through it; with 10,000 live
clients connected, those sockets are numbered past 1024 and ``select.select`` refuses them.
"""

from __future__ import annotations

import os
import resource
import select
from collections.abc import Iterator

import pytest

from pgferry.db.sockets import wait_readable, wait_writable


@pytest.fixture
def high_pipe() -> Iterator[tuple[int, int]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    read_end, write_end = os.pipe()
    try:
        assert read_end > 1024 and write_end > 1024
        yield read_end, write_end
    finally:
        for fd in [*filler, read_end, write_end]:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_descriptors_past_1024_are_waited_on(high_pipe: tuple[int, int]) -> None:
    read_end, write_end = high_pipe
    with pytest.raises(ValueError, match="out of range"):  # what the code did before
        select.select([read_end], [], [], 0)
    assert wait_readable([read_end], 0.05) == set()
    assert wait_writable(write_end, 0.05)
    os.write(write_end, b"x")
    assert wait_readable([read_end, write_end], 1.0) == {read_end}
