"""Everything the program sees is covered by the check that decides success: an altered state is never committed."""

from __future__ import annotations

import pytest

import migcore
from tests._live import Receiver, Writer, random_region
from tests._proxy import CutProxy

STATE = b"state-marker:0123456789abcdef:" * 4
ALTERED = STATE.replace(b"0123", b"0124")


@pytest.mark.parametrize("mode", ["stopcopy", "precopy", "postcopy", "hybrid"])
@pytest.mark.parametrize("token", [None, "a-shared-token-of-some-length"])
def test_a_state_altered_on_the_way_fails_on_both_ends_and_the_source_resumes(mode: str, token: str | None) -> None:
    region = random_region(2 << 20, seed=21)
    writer = Writer(region, seed=21).start()
    resumed: list[bool] = []
    with migcore.listen("tcp://127.0.0.1:0", token=token) as listener:
        receiver = Receiver(listener, timeout=20)
        proxy = CutProxy(listener.address, None, alter=(STATE, ALTERED))
        try:
            with pytest.raises(migcore.VerificationError):
                migcore.migrate(region, proxy.address, mode=mode, pause=writer.pause, state=STATE, timeout=20,
                                token=token, resume=lambda: resumed.append(True))
        finally:
            proxy.join()
        receiver.join()
    assert proxy.altered == 1  # the state went through the proxy once, and was changed
    assert isinstance(receiver.error, migcore.VerificationError), receiver.error
    assert "state" in str(receiver.error)
    assert resumed == [True]  # nothing committed: the program carries on at the source
    assert bytes(region.view) == writer.snapshot  # and its buffer is as it was at the pause
