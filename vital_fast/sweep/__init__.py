"""Bulk sweeps: every channel of a layer (and/or many classes), batch refill, resumable, sharded.

:func:`run_sweep` visualizes a whole layer into one output folder::

    OUT/manifest.json           the run (as :mod:`vital_fast.results` writes it) plus a ``sweep``
                                section: what the sweep is (model fingerprint, layer, targets,
                                settings, seed, images), how far it got
    OUT/targets/<slug>/...      one folder per finished target, written atomically
    OUT/index-rank<R>.jsonl     append-only index: one fsynced line (the target's full record) per
                                finished target, one file per rank
    OUT/.lock                   the folder lock (``filelock``) held by the running sweep (rank 0);
                                ``.lock.holder`` says who holds it

**Engine.** The sweep runs VITAL's recipe on the one engine (:mod:`vital_fast.optim.engine`). A fixed
number of *slots* (``batch``) each hold one target with its own image, its own optimizer (moments and
step count), its own random generator and its own stage of the schedule. Every tick, the occupied slots
are stacked (one stack per resolution when slots sit in different stages of a multi-resolution
schedule), run through the network once, and each slot takes its own step. A slot whose target
finishes (its step budget, or with ``early_stop`` a converged loss) is written out and immediately
refilled with the next target, so the batch stays full. Per-slot arithmetic never mixes slots, so a
target's result does not depend on its slot or its neighbours, and equals a single-target
:func:`vital_fast.optim.visualize` run with the same seed (bit for bit with ``exact=True``, which turns
oneDNN off: oneDNN convolutions round differently per batch size); ``tests/test_sweep.py`` checks it.

**Resume.** A target counts as finished only when its folder is in place *and* its index line is
written (the folder first, fsynced, then the line). On resume the index files are read (a torn last
line is ignored), deduplicated, and checked against the folders; everything else is redone (a
folder written but not yet indexed is replaced atomically, debris of interrupted writes removed). Each
target's seed is ``Target.seed(sweep seed)``, so redoing a target gives the same result; the
results of an interrupted and resumed sweep equal an uninterrupted run's.

**Scale-out.** Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs the same engine on its own
device (``cuda:LOCAL_RANK`` for ``device="cuda"``). Rank 0 takes the lock, checks the folder and
broadcasts which targets are finished; ranks then *claim* pending targets one at a time from an atomic
counter in the rendezvous store, so fast ranks take more (dynamic balancing, no duplicates). Each
rank appends to its own index file; rank 0 reports progress, rewrites the manifest at intervals
and merges all ranks after the final barrier. The gloo backend is used for the few collectives
(no tensors are exchanged), so this also runs on CPU processes.

The package, one job a module: :mod:`~vital_fast.sweep.spec` (which targets: index specs),
:mod:`~vital_fast.sweep.plan` (validation, identity, reference sources), :mod:`~vital_fast.sweep.journal`
(identity, index files, manifest, fsync), :mod:`~vital_fast.sweep.dist` (torchrun coordination),
:mod:`~vital_fast.sweep.slots` (the engine with VITAL's recipe, and a finished slot's files) and :mod:`~vital_fast.sweep.driver`
(:func:`run_sweep`: folder, lock, loop, results). The lock is :class:`vital_fast.runfolder.FolderLock`.
"""

from vital_fast.sweep.driver import SweepSummary, run_sweep
from vital_fast.sweep.journal import read_index, sweep_identity
from vital_fast.sweep.spec import parse_index_spec, single_stage

__all__ = ["SweepSummary", "parse_index_spec", "read_index", "run_sweep", "single_stage", "sweep_identity"]
