"""Generates the gRPC stubs from the repository's proto when the wheel is built.

The stubs are not committed: protoc marks its Python output as not to be
checked in, and generating at build time means an installed client always
matches the proto it was built from.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PROTO_FILE = "billing/coordinator/v1/coordinator.proto"
PACKAGE_DIR = Path("src/billing_coordinator_client/_proto")
# protoc writes an absolute import that only works with the proto root on
# sys.path; the stubs live inside our package instead.
ABSOLUTE_IMPORT = "from billing.coordinator.v1 import coordinator_pb2 as"
RELATIVE_IMPORT = "from . import coordinator_pb2 as"


class CustomBuildHook(BuildHookInterface):  # type: ignore[misc]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        generate(find_proto_root(root), root / PACKAGE_DIR)


def find_proto_root(root: Path) -> Path:
    """The proto directory: packed into an sdist, or two levels up in the repository."""
    for candidate in (root / "proto", root.parent.parent / "proto"):
        if (candidate / PROTO_FILE).is_file():
            return candidate
    raise RuntimeError(
        f"cannot find {PROTO_FILE} in {root / 'proto'} or {root.parent.parent / 'proto'}"
    )


def generate(proto_root: Path, out: Path) -> None:
    """Writes coordinator_pb2.py, .pyi and coordinator_pb2_grpc.py into `out`."""
    import grpc_tools
    from grpc_tools import protoc

    # The well-known types (duration, timestamp) ship with grpcio-tools.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                PROTO_FILE,
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed on {proto_root / PROTO_FILE} (exit {status})")
        generated = Path(tmp) / Path(PROTO_FILE).parent
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "__init__.py").write_text('"""Stubs generated from coordinator.proto at build time."""\n')
        for name in ("coordinator_pb2.py", "coordinator_pb2.pyi"):
            shutil.copy(generated / name, out / name)
        grpc_stub = (generated / "coordinator_pb2_grpc.py").read_text()
        if grpc_stub.count(ABSOLUTE_IMPORT) != 1:
            raise RuntimeError("protoc's import line changed; update hatch_build.py")
        (out / "coordinator_pb2_grpc.py").write_text(
            grpc_stub.replace(ABSOLUTE_IMPORT, RELATIVE_IMPORT)
        )
