"""Memories a LongMem model reads: one contract (base.py), an in-process bank, an on-disk store."""

from .bank import MemoryBank, MemoryBankError
from .base import CombinedMemory, Memory, MemoryRetrieval, MemorySpec, StoreError, merge_retrievals

__all__ = ["CombinedMemory", "Memory", "MemoryBank", "MemoryBankError", "MemoryRetrieval", "MemorySpec", "StoreError",
           "merge_retrievals"]
