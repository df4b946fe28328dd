"""LongMem: language models with long-term memory (frozen backbone + SideNet + memory bank)."""

from .config import LongMemConfig
from .memory import MemoryBank
from .model import GenerationOutput, LongMem, LongMemOutput

__all__ = ["LongMem", "LongMemConfig", "LongMemOutput", "GenerationOutput", "MemoryBank"]
