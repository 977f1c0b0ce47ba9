"""User-facing errors.

Anything a user can cause (a bad file, an unknown target, an invalid N:M scheme, a missing toolchain)
raises :class:`Pbs2pcError` with one sentence that says what is wrong and how to fix it. The CLI prints
that sentence and exits with :data:`EXIT_USER_ERROR`; no traceback is shown. Anything else is a bug and
keeps its traceback.
"""

#: Exit code of the CLI for bad input or a missing tool.
EXIT_USER_ERROR = 2


class Pbs2pcError(Exception):
    """An error the user can fix; its message is one sentence that says how."""


class FormatError(Pbs2pcError):
    """A packed sparse-binary weight or an ONNX file violates the pbs2p op contract."""


class UnsupportedError(Pbs2pcError):
    """A valid input that pbs2pc does not support (yet): an op, a dtype, a target."""


class ToolchainError(Pbs2pcError):
    """An external tool (compiler, emulator) is missing or failed."""
