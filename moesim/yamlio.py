"""Reading YAML files into pydantic models with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from moesim.errors import InputError

__all__ = ["dump_yaml", "load_yaml", "load_yaml_model", "validation_to_input_error"]

M = TypeVar("M", bound=BaseModel)


def load_yaml(path: Path) -> Any:
    """Parse a YAML file; a missing or malformed file becomes an :class:`InputError`."""
    if not path.is_file():
        raise InputError("file not found", file=path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(
            f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})", file=path
        ) from None
    except RecursionError:
        raise InputError("not valid YAML: nested too deeply", file=path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InputError(f"not valid YAML{where}: {problem}", file=path) from None


def validation_to_input_error(exc: ValidationError, file: str | Path) -> InputError:
    """The first pydantic error, as one line naming the field and the value; a field the
    user wrote that is unknown comes before a field missing (the typo ``hardwre`` is
    named, not the ``hardware`` it left missing); a value error's own message without
    pydantic's "Value error, " prefix."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown field"
    elif kind == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
    elif kind == "missing":
        msg = "required field is missing"
    else:
        msg = err["msg"]
    value = None if kind == "missing" else err.get("input")
    if isinstance(value, dict):
        value = None
    return InputError(msg, file=file, field=loc, value=value)


def load_yaml_model(path: Path, model: type[M], **context: Any) -> M:
    """Load ``path`` and validate it as ``model`` (extra fields are rejected by the model)."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("expected a mapping at the top level", file=path)
    try:
        return model.model_validate(data, context=context or None)
    except ValidationError as exc:
        raise validation_to_input_error(exc, path) from None


def dump_yaml(data: Any) -> str:
    """``data`` as block YAML, keys in the order given (what moesim writes, e.g. a derived
    hardware profile)."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
