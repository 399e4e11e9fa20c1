"""labd.signatures: parameters described as JSON Schemas, remote arguments validated and converted."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Literal

import pytest
from pydantic import BaseModel

from labd import InvalidArgumentError, LabDaemon
from labd.signatures import (
    ParameterValidationError,
    constructor_signature,
    nearest_name,
    signature_of,
    type_text,
)

if TYPE_CHECKING:
    from collections.abc import Sequence


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


class Point(BaseModel):
    x: float
    y: float = 0.0


class Laser:
    def __init__(self, device_id: str = "laser1", wavelength: float = 1550.0, port: str = "COM1") -> None:
        self.device_id = device_id

    def set_wavelength(self, wavelength: float) -> None:
        """Tune."""

    def set_mode(self, mode: Literal["fast", "slow"], speed: Mode = Mode.FAST) -> str:
        return mode

    def set_curve(self, points: list[float], gain: float | None = None) -> None: ...

    def configure(self, enabled: bool, count: int, name: str, extra: dict[str, int]) -> None: ...

    def move(self, to: Point) -> None: ...

    def anything(self, value, other: Any = None):  # type: ignore[no-untyped-def]
        return value

    def later(self, value: Sequence[float]) -> None: ...  # an annotation only type checkers see

    def many(self, *values: float, **named: int) -> None: ...


def _validate(method: Any, *args: Any, **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
    sig = signature_of(method)
    assert sig is not None
    return sig.validate(args, kwargs, f"laser1.{method.__name__}()")


def _refused(method: Any, *args: Any, **kwargs: Any) -> ParameterValidationError:
    with pytest.raises(ParameterValidationError) as info:
        _validate(method, *args, **kwargs)
    return info.value


def test_an_int_widens_to_a_float() -> None:
    args, _ = _validate(Laser().set_wavelength, 1550)
    assert args == [1550.0] and isinstance(args[0], float)


@pytest.mark.parametrize("value", ["abc", None, [1, 2], float("inf"), float("nan")])
def test_a_float_parameter_refuses_what_is_not_a_finite_number(value: Any) -> None:
    error = _refused(Laser().set_wavelength, value)
    assert isinstance(error, InvalidArgumentError) and isinstance(error, ValueError)
    (entry,) = error.errors
    assert entry["parameter"] == "wavelength" and entry["expected"] == "float"
    assert entry["schema"] == {"type": "number"}
    assert entry["received"] is value
    assert "'wavelength'" in str(error) and "float" in str(error)


def test_every_bad_parameter_is_listed() -> None:
    error = _refused(Laser().configure, "maybe", 1.5, 7, {"a": "x"})
    assert [e["parameter"] for e in error.errors] == ["enabled", "count", "name", "extra"]
    assert error.labd_context == {"errors": error.errors}


def test_literal_enum_list_optional_and_models_convert() -> None:
    laser = Laser()
    assert _validate(laser.set_mode, "slow", speed="slow") == (["slow"], {"speed": Mode.SLOW})
    assert _refused(laser.set_mode, "medium").errors[0]["parameter"] == "mode"
    assert _validate(laser.set_curve, [1, 2.5], gain=None) == ([[1.0, 2.5]], {"gain": None})
    assert _refused(laser.set_curve, [1, "x"]).errors[0]["parameter"] == "points"
    (point,), _ = _validate(laser.move, {"x": 1})
    assert point == Point(x=1.0)
    assert "x" in _refused(laser.move, {"y": 1}).errors[0]["message"]


def test_unannotated_and_any_parameters_take_any_value() -> None:
    assert _validate(Laser().anything, {"a": [1]}, other=object) == ([{"a": [1]}], {"other": object})


def test_an_annotation_that_cannot_be_evaluated_takes_any_value() -> None:
    assert _validate(Laser().later, "anything") == (["anything"], {})


def test_var_positional_and_var_keyword_are_validated_per_value() -> None:
    assert _validate(Laser().many, 1, 2, a=3) == ([1.0, 2.0], {"a": 3})
    assert _refused(Laser().many, 1, a="x").errors[0]["parameter"] == "a"


def test_a_misspelt_keyword_names_the_nearest_parameter() -> None:
    error = _refused(Laser().set_wavelength, wavelenght=1550)
    messages = [e["message"] for e in error.errors]
    assert "unexpected parameter 'wavelenght'; did you mean 'wavelength'?" in messages
    assert "missing required parameter 'wavelength'" in messages
    assert nearest_name("zzz", ["wavelength"]) is None


def test_too_many_positionals_and_a_parameter_given_twice() -> None:
    assert _refused(Laser().set_wavelength, 1, 2).errors[0]["parameter"] == "args[1]"
    assert "twice" in _refused(Laser().set_wavelength, 1, wavelength=2).errors[0]["message"]


def test_parameters_are_described_with_json_schemas() -> None:
    sig = signature_of(Laser().set_mode)
    assert sig is not None
    mode, speed = sig.describe()
    assert mode == {"name": "mode", "required": True, "default": None,
                    "annotation": "Literal['fast', 'slow']", "kind": "positional_or_keyword",
                    "schema": {"enum": ["fast", "slow"], "type": "string"}, "type": "string"}
    assert speed["default"] == "fast" and speed["schema"]["enum"] == ["fast", "slow"]
    assert sig.returns() == ("str", {"type": "string"})
    curve = signature_of(Laser().set_curve)
    assert curve is not None
    assert curve.describe()[0]["schema"] == {"type": "array", "items": {"type": "number"}}
    assert curve.describe()[1]["annotation"] == "float | None"
    anything = signature_of(Laser().anything)
    assert anything is not None and anything.describe()[0]["schema"] == {}


def test_constructor_signatures_leave_out_the_given_names() -> None:
    sig = constructor_signature(Laser, {"device_id"})
    assert sig is not None
    assert [p["name"] for p in sig.describe()] == ["wavelength", "port"]
    assert sig.validate([], {"wavelength": 1500}, "Laser") == ([], {"wavelength": 1500.0})
    assert constructor_signature(Laser, {"device_id"}) is sig  # cached per class


def test_one_signature_is_cached_per_function() -> None:
    assert signature_of(Laser().set_wavelength) is signature_of(Laser().set_wavelength)


def test_type_text_drops_module_prefixes() -> None:
    assert type_text(list[Mode]) == "list[Mode]"
    assert type_text(Literal["a.b"]) == "Literal['a.b']"


def test_a_local_call_by_name_suggests_the_nearest_keyword() -> None:
    with LabDaemon() as daemon:
        daemon.register_plugins(devices={"Laser": Laser})
        daemon.add_device("laser1", "Laser")
        with pytest.raises(InvalidArgumentError, match="did you mean 'wavelength'"):
            daemon.call_device("laser1", "set_wavelength", kwargs={"wavelenght": 1})
        # Local calls stay plain Python: no conversion, no type check.
        assert daemon.call_device("laser1", "set_mode", ["anything"]) == "anything"
