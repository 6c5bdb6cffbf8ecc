"""The identity-preserving learned face codec: training side (torch + CompressAI).

Modules, each one small part of the pipeline:

* `data`    -- the cached training set: aligned canonical crops, their teacher embeddings,
               and the source frames for full-frame batches;
* `teacher` -- MobileFaceNet in torch (converted from the shared ONNX file), frozen, plus the
               differentiable re-warp from a crop to its ArcFace 112x112 template;
* `model`   -- the codec (analysis / synthesis transforms, per-quality gain units and
               factorised entropy bottlenecks) and its registry `create_codec_model`;
* `widen`   -- grows a trained codec into a wider architecture computing the same function;
* `losses`  -- rate + lambda * distortion + mu * identity;
* `speed`   -- ONNX export of the encoder / decoder graphs and their ONNX Runtime latency;
* `train`   -- the resumable training loop (`python -m facelink.export.codec.train`);
* `frontier` -- a run's held-out identity and PSNR against a reference run's at equal bytes.

Importing this package does not import torch: the submodules do.
"""
