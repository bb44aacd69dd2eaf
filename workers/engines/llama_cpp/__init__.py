"""The llama_cpp engine (being split by concern: the engine is in engine.py for now)."""

from workers.engines.llama_cpp.engine import add_arguments, build, process_environment

__all__ = ["add_arguments", "build", "process_environment"]
