"""The guest SDK imports only requests, tenacity, click and the standard library (docs/sdk.md: the guest install pulls in nothing else)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import guest_sdk

ALLOWED_THIRD_PARTY = {"requests", "tenacity", "click"}
SDK_DIR = Path(guest_sdk.__file__).parent


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imports_sdk_uses_only_requests_tenacity_click_and_stdlib() -> None:
    files = sorted(SDK_DIR.glob("*.py"))
    assert files
    for path in files:
        foreign = _imported_top_levels(path) - ALLOWED_THIRD_PARTY - sys.stdlib_module_names - {"guest_sdk"}
        assert not foreign, f"{path.name} imports {sorted(foreign)}"


def test_imports_public_names() -> None:
    for name in (
        "MaintenanceClient",
        "MaintenanceEvent",
        "EventKind",
        "GuestSDKError",
        "MetadataUnavailable",
        "NotOnDroplet",
        "ProtocolError",
        "WaitTimeout",
    ):
        assert name in guest_sdk.__all__
        assert getattr(guest_sdk, name) is not None
    assert issubclass(guest_sdk.WaitTimeout, TimeoutError)
    assert issubclass(guest_sdk.WaitTimeout, guest_sdk.GuestSDKError)
    assert issubclass(guest_sdk.MetadataUnavailable, guest_sdk.GuestSDKError)
    assert (SDK_DIR / "py.typed").exists()
