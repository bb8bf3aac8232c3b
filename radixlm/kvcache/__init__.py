"""KV memory: the paged pool, the page allocator and the radix prefix cache."""

from radixlm.kvcache.allocator import PageAllocator
from radixlm.kvcache.pool import KVPool
from radixlm.kvcache.radix_tree import MatchResult, RadixCache, TreeNode

__all__ = ["KVPool", "MatchResult", "PageAllocator", "RadixCache", "TreeNode"]
