"""Measures the local devices and writes a DeviceProfile of what they achieve.

The datasheet profiles give peak rates; a step on this machine runs at the rates its kernels
reach. `calibrate` times a few kernels on `jax.devices()[0]` (and collectives over all local
devices of that platform) and turns the timings into a profile:

- matmul: square `n x n @ n x n` products per dtype; `peak_flops` is the best rate measured.
- memory: `memory_bandwidth` is in the planner's units: the bytes the planner counts for a
  memory-bound reference train step (layer norm, gelu, residual add, log-sum-exp), divided by
  the step's measured time, median over a few activation sizes. The planner sums XLA's
  per-equation bytes and counts a share of them for fused ops; what a device really does with
  such a step depends on more than DRAM speed (on a CPU, fused kernels with transcendentals run
  several times below it). The raw rate of a streaming kernel (`y = a * x + b` with a fresh
  output, arrays beyond the caches) is measured too and reported in the notes.
- kernel overhead: the slope of the time of a chain of tiny dependent matmuls over the chain's
  length, i.e. what one more kernel costs when it has almost no work.
- collectives (two or more local devices): all-reduce (psum) and all-gather over every local
  device at several sizes, fitted by least squares to the ring alpha-beta model of `cost.py`.

Because the rates are achieved ones, the efficiencies are 1. Figures the machine cannot show
(links between nodes, power) come from a built-in base profile, and the notes say which.
"""

from wapar_jax._src.calibrate.measure import TINY_SIZES as TINY_SIZES
from wapar_jax._src.calibrate.measure import fit_link as fit_link
from wapar_jax._src.calibrate.measure import fit_matmul as fit_matmul
from wapar_jax._src.calibrate.measure import measure as measure
from wapar_jax._src.calibrate.profile import calibrate as calibrate
from wapar_jax._src.calibrate.profile import to_profile as to_profile
