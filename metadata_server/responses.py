"""Error answers in two shapes: a JSON object, or one text/plain line."""

from __future__ import annotations

import json
from http import HTTPStatus

Headers = list[tuple[str, str]]
Answer = tuple[int, Headers, bytes]

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
NO_STORE = ("Cache-Control", "no-store")


def status_line(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


def error(code: int, err: str, message: str, *, as_json: bool, field: str | None = None) -> Answer:
    if as_json:
        doc: dict[str, str] = {"error": err, "message": message}
        if field is not None:
            doc["field"] = field
        body = json.dumps(doc).encode()
        ctype = JSON
    else:
        body = (message.replace("\n", " ") + "\n").encode()
        ctype = TEXT
    return code, [("Content-Type", ctype), ("Content-Length", str(len(body))), NO_STORE], body
