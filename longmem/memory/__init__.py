from .bank import MemoryBank, MemoryBankError, MemoryRetrieval

__all__ = ["MemoryBank", "MemoryBankError", "MemoryRetrieval"]
