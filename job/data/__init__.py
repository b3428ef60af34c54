"""Everything about data, behind one front door.

  load(settings, runtime)   the dataset JOB_DATA_URI points at, as data sources (training)
  labelled / inputs         what evaluate scores and predict runs, with a model's preprocessing
  prepare                   write a dataset as shards (`python -m job prepare`)

Inside, one module a concern: layout (what a dataset holds: one layout detector, one class
discovery), idx and images (reading MNIST files and image files), augment (the one per-sample
preprocessing of folders and shards), sources (what the loop reads: batches in a seeded order,
the train/val split, each rank's share), mirror (the local copy of a remote dataset), and the
shards: index (index.json), cache (the bounded local cache), stream (shards as a source),
prepare_shards (writing them). Imports run one way: this package imports the modules, never the
reverse, and no module calls another's private function.
"""

from job.data.dataset import Data, load
from job.data.inference import Inputs, Labelled, inputs, labelled
from job.data.prepare_shards import prepare

__all__ = ["Data", "Inputs", "Labelled", "inputs", "labelled", "load", "prepare"]
