"""The lightweight query model of the asymmetric matcher, and the gallery -> query transformations.

Modules:

* `model`      -- the query network (MobileFaceNet slimmed to a 64-96 px input) and its registry
                  `create_query_model`, plus initialisation from the deployed MobileFaceNet;
* `data`       -- the training split and the augmented views the query model is trained on;
* `train`      -- the resumable distillation loop (`python -m facelink.export.query.train`);
* `evaluate`   -- per-epoch LFW View 2 through the ONNX export, and the held-out proxy;
* `export`     -- ONNX export of a trained query model and its manifest
                  (`python -m facelink.export.query.export`);
* `embeddings` -- the embedding store the transformations train from (computed once per model);
* `transforms` -- the gallery -> query embedding transformations, trained from stored embeddings
                  (`python -m facelink.export.query.transforms`).

Importing this package does not import torch: the submodules do.
"""
