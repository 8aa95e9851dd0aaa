"""Training S3 and Cutie networks (``s3 train``).

Modules: :mod:`~s3cli.train.config` (typed settings, TOML files), :mod:`~s3cli.train.data`
(dataset readers, sampling, augmentation), :mod:`~s3cli.train.wrapper` (the training forward
pass over a sequence), :mod:`~s3cli.train.losses` (point-sampled loss) and
:mod:`~s3cli.train.trainer` (optimiser, schedule, AMP, DDP, checkpoints, logs). Importing this
package imports no torch.
"""
