from .bank import MemoryBank, MemoryBankError, MemoryRetrieval, merge_retrievals

__all__ = ["MemoryBank", "MemoryBankError", "MemoryRetrieval", "merge_retrievals"]
