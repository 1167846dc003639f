"""pyspec-gguf: draft-guided approximate inference for long prompts on GGUF models."""

# llama_cpp loads libllama first, by the path it always uses; the extension
# then binds to that same copy (its soname is already loaded), so a process
# holds one libllama and a CUDA or Metal build of llama-cpp-python serves both.
import llama_cpp as _llama_cpp  # noqa: F401  isort: skip

from ._log import set_verbose
from .compress import Compressed
from .document import Document
from .engine import Context, Model, Sampling, iter_text
from .methods import METHODS, make_method
from .registry import ChecksumError, FetchError, cache_dir, default_model, fetch, resolve
from .session import Cancelled, Result, SpecSession, Stats, Stream
from .store import StateFileError

__version__ = "0.1.0"

__all__ = [
    "Cancelled", "ChecksumError", "Compressed", "Context", "Document", "FetchError", "METHODS", "Model", "Result", "Sampling", "SpecSession", "StateFileError",
    "Stats", "Stream", "cache_dir", "default_model", "fetch", "iter_text", "make_method", "resolve", "set_verbose",
]
