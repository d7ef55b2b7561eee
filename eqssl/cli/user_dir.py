"""Print the folder to pass to fairseq as ``--user-dir`` / ``common.user_dir``."""

import os


def user_dir() -> str:
    """The absolute path of the installed ``eqssl`` package."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    print(user_dir())


if __name__ == "__main__":
    main()
