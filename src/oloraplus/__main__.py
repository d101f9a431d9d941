"""The ``oloraplus`` command: process-wide settings that must precede PyTorch's import, then the CLI."""

from oloraplus.fast.memory import use_huge_page_allocations


def main() -> int:
    use_huge_page_allocations()  # PyTorch reads it at its first allocation: before oloraplus.cli imports torch
    from oloraplus.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
