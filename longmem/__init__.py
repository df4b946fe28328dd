"""LongMem: language models with long-term memory (frozen backbone + SideNet + memory).

The library imports no Ray; the Ray programs (build memory, train, evaluate, serve) and the
`longmem` command live in the `pipelines` package."""

from .config import LongMemConfig
from .generation import GenerationOutput
from .loading import ModelSource, load_model
from .memory import CombinedMemory, Memory, MemoryBank
from .model import LongMem, LongMemOutput

__all__ = ["CombinedMemory", "GenerationOutput", "LongMem", "LongMemConfig", "LongMemOutput", "Memory", "MemoryBank",
           "ModelSource", "load_model"]
