"""Loading and running compiled artifacts. Imports no compiler code (works with TVM's runtime alone).

>>> import pbs2pc.runtime
>>> model = pbs2pc.runtime.load("model.so")                      # doctest: +SKIP
>>> logits = model.logits([[1, 2, 3]])                           # doctest: +SKIP
>>> print(model.generate("Once upon a time", max_new_tokens=32).text)   # doctest: +SKIP
>>> outputs = pbs2pc.runtime.load("layer.so").run({"x": x})      # doctest: +SKIP
"""

from pbs2pc.runtime.generate import Generation, GenerationStats, Token
from pbs2pc.runtime.model import CompiledModel, KVCache, load
from pbs2pc.runtime.sampling import SamplingParams

__all__ = ["CompiledModel", "Generation", "GenerationStats", "KVCache", "SamplingParams", "Token", "load"]
