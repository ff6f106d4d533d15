"""`python -m jaxreason COMMAND ...`: see `jaxreason.cli`."""

from jaxreason.cli import main

if __name__ == "__main__":
    main()
