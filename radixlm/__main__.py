"""``python -m radixlm serve ...``: the same as the ``radixlm`` console script."""

from radixlm.server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
