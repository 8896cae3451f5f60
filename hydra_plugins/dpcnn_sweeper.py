"""dpcnn's Hydra sweeper (``hydra/sweeper=dpcnn``): grid or Optuna trials, run by every MPI rank in lockstep.

Hydra instantiates sweepers only from classes defined under the ``hydra_plugins``
namespace package, so this module holds the name; the code is in `dpcnn.sweep.sweeper`.
"""

from dpcnn.sweep.sweeper import MpiSweeper


class DpcnnSweeper(MpiSweeper):
    """See `dpcnn.sweep.sweeper.MpiSweeper`."""
