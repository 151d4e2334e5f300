"""The ``paif`` command (``[project.scripts]`` in pyproject.toml): the user-facing end of PAIF in one place.

PAIF: Liu et al., ACM MM 2023. Subcommands forward to the entry points, which also run as scripts::

    paif fuse --checkpoint CKPT --data DIR --out OUT [--seg]      # = python trainer/fuse.py ...
    paif export-onnx --checkpoint CKPT --out model.onnx [--part fusion|full]   # = python trainer/export_onnx.py ...
    paif info CKPT                                                # = python -m trainer.checkpoint info CKPT
    paif export CKPT --safetensors OUT                            # = python -m trainer.checkpoint export ...
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

__all__ = ["COMMANDS", "main"]


def _fuse(argv: list[str]) -> int:
    from trainer.fuse import main as fuse_main

    return fuse_main(argv, prog="paif fuse")


def _export_onnx(argv: list[str]) -> int:
    from trainer.export_onnx import main as export_main

    return export_main(argv, prog="paif export-onnx")


def _checkpoint(command: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from trainer.checkpoint import main as checkpoint_main

        return checkpoint_main([command, *argv])

    return run


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "fuse": (_fuse, "fuse a folder of IR-VIS pairs (fused RGB, optional segmentation)"),
    "export-onnx": (_export_onnx, "export a checkpoint to ONNX (dynamic batch, height, width)"),
    "info": (_checkpoint("info"), "print a checkpoint's model card"),
    "export": (_checkpoint("export"), "export a checkpoint's weights as safetensors"),
}


def _usage() -> str:
    lines = ["usage: paif COMMAND [ARGS]  (paif COMMAND --help for its arguments)", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``paif COMMAND ARGS``; returns the command's exit code (2 for an unknown command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; expected one of {', '.join(COMMANDS)}\n\n{_usage()}",
              file=sys.stderr)
        return 2
    return COMMANDS[args[0]][0](args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
