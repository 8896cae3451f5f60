"""dpcnn's Hydra sweeper (``hydra/sweeper=dpcnn``): grid or Optuna trials, run by every MPI rank in lockstep.

Hydra instantiates sweepers only from classes defined under the ``hydra_plugins``
namespace package, so this module holds the name; the code is in `dpcnn.sweep.sweeper`.
Hydra imports every plugin when it starts, so importing `dpcnn.config` here also registers
dpcnn's typed config schema (``dpcnn_schema``) for any composition of dpcnn's conf/, e.g.
through Hydra's compose API, not only for ``python -m dpcnn.train``.
"""

import dpcnn.config  # noqa: F401 - registers the dpcnn_schema structured config
from dpcnn.sweep.sweeper import MpiSweeper


class DpcnnSweeper(MpiSweeper):
    """See `dpcnn.sweep.sweeper.MpiSweeper`."""
