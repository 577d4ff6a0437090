"""``python -m kseg`` is the ``kseg`` command."""

from kseg.cli import main

if __name__ == "__main__":
    main()
