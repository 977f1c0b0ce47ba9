"""pbs2pc: compile LLMs compressed with PBS2P (N:M sparse + binary weights) into shared libraries.

Subpackages (each a top-level folder of the repository):

- ``pbs2pc.models``   PyTorch side: checkpoints, compression, the packed format, ONNX export. No TVM.
- ``pbs2pc.compiler`` ONNX -> Relax frontend, target presets, the phase pipeline, build.
- ``pbs2pc.passes``   Relax passes (one per file), TE kernels and schedule rules.
- ``pbs2pc.runtime``  Loading and running compiled artifacts. Imports no compiler code.
"""

__version__ = "0.1.0"

#: Version of the ``pbs2p`` ONNX op contract (docs/format.md). Readers accept every version up to this one
#: (v2 only adds optional inputs); bump on any change.
FORMAT_VERSION = 2
