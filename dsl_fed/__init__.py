"""dsl_fed: federated DeepSpectrumLite for speech and audio recognition.

The core library never imports Flower; the Flower edge is `dsl_fed.federated`, loaded only by the Flower apps
(`server/`, `clients/`) and `dsl_fed simulate`.
"""

from dsl_fed.errors import DslFedError

__version__ = "0.1.0"
__all__ = ["DslFedError", "__version__"]
