"""OpenAPI 3 documents as the operations a service promises: method, path template, response codes.

Outside the coverage package and free of pandas, so the pytest plugin can check its
``--hoptrace-openapi`` documents before the session starts.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from hoptrace._errors import HoptraceError
from hoptrace._stored import read_text_file


class OpenAPIError(HoptraceError):
    """An OpenAPI document, or a SERVICE=FILE argument naming one, cannot be used."""


_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PARAM = re.compile(r"\{[^/{}]+\}")


@dataclass(frozen=True)
class Operation:
    service: str
    method: str  # upper case
    template: str  # /cart/{cart_id}
    operation_id: str | None
    responses: tuple[str, ...]  # as documented: "200", "4XX", "default"

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and _template_regex(self.template).fullmatch(path) is not None


@functools.lru_cache(maxsize=1024)
def _template_regex(template: str) -> re.Pattern:
    # A path parameter is one segment (OpenAPI 3: path parameters never contain "/").
    parts = _PARAM.split(template)
    return re.compile("[^/]+".join(re.escape(part) for part in parts))


def parse_spec_arg(value: str) -> tuple[str, Path]:
    """``NAME=FILE`` -> (service, path)."""
    name, sep, file = value.partition("=")
    if not sep or not name.strip() or not file.strip():
        raise OpenAPIError(f"--openapi {value!r}: expected SERVICE=FILE, e.g. gateway=openapi/gateway.yaml")
    return name.strip(), Path(file.strip())


def load_spec(service: str, path: Path) -> list[Operation]:
    """The operations of one OpenAPI 3 document (YAML or JSON); OpenAPIError names what is wrong."""
    try:
        text = read_text_file(path)
    except FileNotFoundError:
        raise OpenAPIError(f"{path}: no such OpenAPI document") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OpenAPIError(f"{path}: cannot read the OpenAPI document ({exc})") from None
    document = _parse(path, text)
    if not isinstance(document, dict) or not str(document.get("openapi", "")).startswith("3"):
        raise OpenAPIError(f"{path}: not an OpenAPI 3 document (no 'openapi: 3.x' at the top)")
    paths = document.get("paths")
    if not isinstance(paths, dict):
        raise OpenAPIError(f"{path}: 'paths' must be a mapping of path templates")
    operations = []
    for template, item in paths.items():
        if not isinstance(template, str) or not template.startswith("/") or not isinstance(item, dict):
            raise OpenAPIError(f"{path}: path {template!r} must start with '/' and hold a mapping of operations")
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            responses = op.get("responses") if isinstance(op, dict) else None
            if not isinstance(responses, dict):
                raise OpenAPIError(f"{path}: {method.upper()} {template} needs a 'responses' mapping")
            op_id = op.get("operationId")
            operations.append(
                Operation(
                    service, method.upper(), template, str(op_id) if op_id is not None else None, tuple(map(str, responses))
                )
            )
    return operations


def _parse(path: Path, text: str):
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise OpenAPIError(f"{path}: not valid JSON ({exc})") from None
        except RecursionError:
            raise OpenAPIError(f"{path}: nested too deeply to read") from None
    try:
        import yaml
    except ImportError:
        raise OpenAPIError(f"{path}: reading YAML needs PyYAML (pip install 'hoptrace[coverage]'), or give JSON") from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise OpenAPIError(f"{path}: nested too deeply to read") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise OpenAPIError(f"{path}: not valid YAML{at}") from None


def response_seen(documented: str, statuses: set[int]) -> bool:
    """Whether a documented response code ("404", "4XX", "default") was answered."""
    if documented == "default":
        return True  # "anything else": nothing to miss
    if len(documented) == 3 and documented[1:].upper() == "XX" and documented[0].isdecimal():
        return any(s // 100 == int(documented[0]) for s in statuses)
    return documented.isdecimal() and int(documented) in statuses


def load_specs(args) -> list[Operation]:
    """``SERVICE=FILE`` arguments -> every documented operation."""
    operations: list[Operation] = []
    for arg in args:
        operations += load_spec(*parse_spec_arg(arg))
    return operations
