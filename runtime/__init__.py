"""Loading and running compiled artifacts. Imports no compiler code (works with TVM's runtime alone).

>>> import pbs2pc.runtime
>>> model = pbs2pc.runtime.load("model.so")          # doctest: +SKIP
>>> logits = model.logits([[1, 2, 3]])               # doctest: +SKIP
"""

from pbs2pc.runtime.model import CompiledModel, load

__all__ = ["CompiledModel", "load"]
