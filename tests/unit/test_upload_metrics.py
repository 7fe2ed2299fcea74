"""A checkpoint's metrics as the coordinator stores them: numbers, non-finite ones as null."""

from __future__ import annotations

import math

import grpc
import pytest

from coordinator.uploads import _metrics


class Aborted(Exception):
    pass


class Context:
    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)


def test_numbers_pass_and_what_no_float_can_hold_becomes_null() -> None:
    metrics = {"loss": 0.25, "step": 7, "nan": math.nan, "inf": -math.inf, "huge": 10**400}
    assert _metrics(Context(), metrics) == {
        "loss": 0.25,
        "step": 7.0,
        "nan": None,
        "inf": None,
        "huge": None,
    }


@pytest.mark.parametrize("metrics", [{"loss": "0.1"}, {"ok": True}, [1.0], {"x": None}])
def test_anything_but_a_table_of_numbers_is_refused(metrics: object) -> None:
    with pytest.raises(Aborted) as raised:
        _metrics(Context(), metrics)
    assert raised.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT
