"""Memories a LongMem model reads: one contract (base.py), an in-process bank, an on-disk store."""

from .bank import MemoryBank, MemoryBankError
from .base import (CombinedMemory, Memory, MemoryRetrieval, MemorySpec, RowMemories, StoreError, merge_retrievals,
                   split_retrieval, stack_retrievals)

__all__ = ["CombinedMemory", "Memory", "MemoryBank", "MemoryBankError", "MemoryRetrieval", "MemorySpec", "RowMemories",
           "StoreError", "merge_retrievals", "split_retrieval", "stack_retrievals"]
