"""python -m sqlproxy runs the same command line as the sqlproxy script."""

from sqlproxy.cli import main

if __name__ == "__main__":
    main()
