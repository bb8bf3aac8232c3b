"""``python -m radixlm serve ...``: the same as the ``radixlm`` console script."""

from radixlm.process_exit import exit_now
from radixlm.server.cli import main

if __name__ == "__main__":
    # The command is done once main() returns (the engine is shut down, the server stopped):
    # end without the interpreter's teardown of the torch heap (seconds on a loaded host).
    exit_now(main() or 0)
