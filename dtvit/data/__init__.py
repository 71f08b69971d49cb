"""dtvit's data: sources (`sources.py`, `tfds_folder.py`), per-example augmentation (`augment.py`), grain
batching (`pipeline.py`), the train split resident in device memory (`resident.py`, `data.placement='device'`)
and on-device mixup/cutmix (`mixing.py`).

A train batch's path: a source's record -> `augment.train_example` (crop, RandAugment, shift, flip) ->
normalised, one-hot target -> batched by grain, this process's slice of the global batch -> on device,
`mixing.mix_batch` inside the jitted train step.
"""
from dtvit.data.mixing import mix_batch, mix_key, scheduled_mix_batch
from dtvit.data.pipeline import default_data_config, eval_batches, eval_dataset, train_batches, train_dataset
from dtvit.data.sources import NAMES, DatasetInfo, get_info
from dtvit.data.spec import preprocess, read_spec, write_spec

__all__ = ['NAMES', 'DatasetInfo', 'default_data_config', 'eval_batches', 'eval_dataset', 'get_info',
           'mix_batch', 'mix_key', 'preprocess', 'read_spec', 'scheduled_mix_batch', 'train_batches',
           'train_dataset', 'write_spec']
