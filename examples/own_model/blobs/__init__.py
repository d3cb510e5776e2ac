"""A small user package for hawq: find a blob in an 8x8 image (a regression task).

- ``blobs.model:make_model``: a small CNN with two outputs (the blob's row and column);
- ``blobs.data:make_datasets``: train / eval / Hessian map-style Datasets that draw each item
  from its index on access (nothing is held in memory);
- ``blobs.loss:mse``: the mean squared error, the task loss (not cross-entropy).
"""
