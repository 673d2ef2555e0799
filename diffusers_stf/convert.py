"""The command line of :mod:`diffusers_stf.conversion`: ``python -m diffusers_stf.convert edm|dg …`` (``--help``)."""

from .conversion.cli import main

if __name__ == "__main__":
    main()
