"""dsl_fed: federated DeepSpectrumLite for speech and audio recognition.

The core library never imports Flower; Flower adapters live in `clients/` and `server/`.
"""

from dsl_fed.errors import DslFedError

__version__ = "0.1.0"
__all__ = ["DslFedError", "__version__"]
