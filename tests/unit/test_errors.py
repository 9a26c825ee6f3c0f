import asyncio

import msgspec
import pytest

from protos.infer import GenerateRequest
from protos.memory import UpsertRequest
from shared import errors

pytestmark = pytest.mark.unit


def _validation_error(payload: bytes, typ) -> msgspec.ValidationError:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(payload, type=typ)
    return info.value


@pytest.mark.parametrize(
    "payload, typ, field",
    [
        (b'{"prompt": 5}', GenerateRequest, "prompt"),
        (b'{"max_tokens": "x"}', GenerateRequest, "max_tokens"),
        (b'{"max_tokens": 0}', GenerateRequest, "max_tokens"),
        (b'{}', UpsertRequest, "documents"),
        (b'{"documents": [{"namespace": "a"}]}', UpsertRequest, "documents[0].text"),
        (b'{"documents": [{"text": "t", "namespace": "bad ns"}]}', UpsertRequest, "documents[0].namespace"),
    ],
)
def test_validation_errors_name_the_field(payload, typ, field):
    error = errors.translate(_validation_error(payload, typ))
    assert isinstance(error, errors.BadRequest)
    assert error.field == field
    assert error.body()["error"]["field"] == field


def test_malformed_json_is_bad_request():
    with pytest.raises(msgspec.DecodeError) as info:
        msgspec.json.decode(b"{nope", type=GenerateRequest)
    error = errors.translate(info.value)
    assert error.code == 400 and error.field == "$"


def test_timeouts_map_to_504():
    assert errors.translate(asyncio.TimeoutError()).code == 504


def test_unexpected_exception_never_leaks_repr():
    secret = "password=hunter2"
    error = errors.translate(RuntimeError(secret))
    assert error.code == 500
    assert secret not in error.message and "RuntimeError" not in error.message


def test_reply_round_trip_keeps_type_and_field():
    original = errors.NotFound("unknown model", field="model")
    rebuilt = errors.from_reply(str(original.code), original.message, msgspec.json.encode(original.body()))
    assert isinstance(rebuilt, errors.NotFound)
    assert rebuilt.field == "model" and rebuilt.message == "unknown model"
