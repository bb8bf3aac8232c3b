"""A host that only runs tensor-parallel ranks (``--nnodes K --node-rank R`` with R > 0).

Node 0 runs the engine core (scheduler, radix tree) and the server; every other node starts the
workers of its ranks, which join node 0's process group at ``--dist-init-addr`` and then follow
rank 0's broadcasts until rank 0 stops them.
"""

from __future__ import annotations

import logging

from radixlm.config import EngineConfig
from radixlm.executor.errors import RunnerDeadError
from radixlm.executor.tp_worker import WorkerGroup, worker_specs
from radixlm.model.loader import model_metadata_dir
from radixlm.tokenizer.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)


def serve_worker_node(config: EngineConfig) -> int:
    """Run this host's ranks until rank 0 stops them.

    Args:
        config: the same engine options as node 0's, with this host's ``node_rank``; the model
            must be at the same path here.

    Returns:
        0 when the ranks were stopped by rank 0, 1 when one failed.

    Raises:
        ValueError: node_rank is 0, no dist_init_addr, no model, or a model or topology that
            cannot be split this way.
    """
    parallel = config.parallel
    if parallel.node_rank < 1:
        raise ValueError("node 0 runs the engine; serve_worker_node is for node_rank >= 1")
    if not parallel.dist_init_addr:
        raise ValueError("a worker node needs --dist-init-addr HOST:PORT (node 0's address)")
    path = config.model.model
    if path is None:
        raise ValueError("a worker node needs --model (the same model as node 0)")
    meta_dir = model_metadata_dir(path)
    # Sampling's min_new_tokens masks EOS ids: every rank must know the same ones.
    eos = frozenset(eos_token_ids(load_tokenizer(config.model.tokenizer or meta_dir), meta_dir))
    specs = worker_specs(
        path,
        config.model,
        config.cache,
        parallel,
        eos,
        progress=False,
        init_addr=parallel.dist_init_addr,
    )
    group = WorkerGroup(specs)
    try:
        group.wait_ready()
        logger.info("node %d: ranks %s ready", parallel.node_rank, group.ranks)
        group.wait_exit()
    except RunnerDeadError as exc:
        logger.error("node %d stops: %s", parallel.node_rank, exc)
        return 1
    finally:
        group.stop()
    logger.info("node %d: ranks stopped by rank 0", parallel.node_rank)
    return 0
