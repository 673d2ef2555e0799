"""``python -m diffusers_stf.conversion``, the same as ``python -m diffusers_stf.convert``."""

from .cli import main

if __name__ == "__main__":
    main()
