"""The evolution-strategy gradient estimate in three steps: plan, evaluate, reduce.

- :mod:`.plan`: seed, this rank's sample ids, the parameter layout in segments, backends, kept noise;
- :mod:`.evaluate`: the perturbed losses (loop, vmapped batches, in place) as blocks;
- :mod:`.reduce`: weights from the method (and fitness shaping), then ``sum_i w_i z_i``;
- :mod:`.distributed`: the samples spread over a ``torch.distributed`` group;
- :mod:`.pipeline`: the three in a row (the fused path); :mod:`.recorded`: the differentiable estimate
  (``create_graph=True``, ``torch.func``).

What perturbs is the noise (:mod:`zo_kernels.noise`); the arguments are checked once in
:mod:`zo_kernels.config`.
"""

from .evaluate import EvaluatorState
from .pipeline import estimate_gradients, estimate_weights
from .reduce import NonFiniteLossError, raise_if_estimate_not_finite

__all__ = [
    "EvaluatorState",
    "NonFiniteLossError",
    "estimate_gradients",
    "estimate_weights",
    "raise_if_estimate_not_finite",
]
