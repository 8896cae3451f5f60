"""Hyperparameter sweeps under MPI: every rank runs the same trials, in lockstep.

``mpirun -n 2 python -m dpcnn.train -m optimizer.lr=0.01,0.1`` (a grid) and
``mpirun -n 2 python -m dpcnn.train -m hparams_search=optuna`` start one Hydra
multirun per rank. Each trial is a data-parallel training job, so all ranks
must run the same job sequence with the same configs. Three pieces:

- `MpiSweeper` (``sweeper.py``; ``hydra/sweeper=dpcnn``; Hydra loads sweepers
  only from the ``hydra_plugins`` package, so ``hydra_plugins/dpcnn_sweeper.py``
  exposes it). Rank 0 alone expands the grid or asks Optuna for the next trial
  and broadcasts the trial's overrides; every rank then launches that one job.
  The Optuna study (sampler, storage) lives on rank 0 only; it is told the
  trial's objective, which every rank returns identically.
- `begin_trial` / `end_trial` (``trial.py``), called by the task function on
  every rank: the trial's composed config must hash the same on every rank and
  the objective (allreduced by training) must be bitwise the same everywhere;
  if not, `SweepError` ends the sweep on all ranks with one clear line. A trial
  that fails (diverges, a config that cannot build) returns NaN: it is FAILED
  in MLflow and in Optuna, and the sweep goes on.
- `SweepCallback` (``record.py``; ``hydra.callbacks.sweep``; rank 0 only, no
  collectives, so a tracking outage cannot desynchronise the ranks): one MLflow
  parent run per sweep; every trial is a nested child (the tracker reads
  ``DPCNN_MLFLOW_PARENT_RUN_ID`` and ``DPCNN_MLFLOW_TAGS``, named once as
  `dpcnn.tracking.ENV_PARENT` / `ENV_TAGS`); a trial that fails before its run
  starts gets a FAILED child of its own. At the end the parent gets the best
  trial (tags, metric, ``best_config.yaml``), every trial (``trials.csv``) and
  ``sweep_summary.png`` (`dpcnn.viz.summary_plot`: objective vs each swept
  parameter, and the optimisation history); the same files and
  ``best_command.txt`` (a ready-to-run command) land in the sweep directory.

Hydra passes nothing between these three; what they tell each other within
one process goes through the one `TrialState` of the package, `TRIAL`
(`trial.py` lists who writes and who reads each field).

Re-runs never duplicate children silently. A sweep is identified by a key
hashed from its command-line overrides, its sweeper settings (except
``n_trials``) and its composed base config; a trial by the hash of its
composed config. Running the same sweep again (e.g. after it was killed, or
with a larger ``n_trials``) resumes it: the earlier parent run is reused and a
trial whose config already FINISHED or FAILED there is not trained again
(training is deterministic): its recorded objective is returned, so a seeded
Optuna sampler proposes the same next trials. Trials left RUNNING or KILLED are
trained again, the new child tagged ``dpcnn.sweep.retry_of``. With
``hydra.callbacks.sweep.resume=false`` a new parent is started and everything
is trained again; a child whose config already ran in an earlier run of the
same sweep is tagged ``dpcnn.sweep.duplicate_of``.
"""

from ..tracking import ENV_PARENT, ENV_TAGS
from .record import TERMINAL_OK, SweepCallback, TrialRecord, command_for, sweep_key
from .sweeper import MpiSweeper, MpiSweeperConf, search_space
from .trial import (
                    ENV_AUDIT,
                    TRIAL,
                    SweepError,
                    TrialState,
                    begin_trial,
                    config_digest,
                    digest,
                    end_trial,
                    note_failure,
                    objective_name,
)

__all__ = ["ENV_AUDIT", "ENV_PARENT", "ENV_TAGS", "TERMINAL_OK", "TRIAL", "MpiSweeper", "MpiSweeperConf",
           "SweepCallback", "SweepError", "TrialRecord", "TrialState", "begin_trial", "command_for", "config_digest",
           "digest", "end_trial", "note_failure", "objective_name", "search_space", "sweep_key"]
