"""The model: a CTC Transformer encoder whose feed-forward blocks are mixtures of experts.

- ``routing``: the router (``RouterGate``, a DeepSpeed ``TopKGate``), one per MoE layer (switch) or shared (omni)
- ``experts``: the experts of a layer, as a grouped GEMM or one GEMM per expert; dropless dispatch
- ``ctc``: ``CTCModel``: front end, CAPE positions, pre-LayerNorm blocks, output layer
- ``objective``: the CTC loss and the routers' auxiliary losses over the global batch

May import ``trainer.config`` and ``trainer.runtime``; never ``trainer.data`` nor the run's modules above.
"""
