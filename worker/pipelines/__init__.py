"""What serves a model folder: ONNX Runtime sessions, the model manifest, and the tensor and text pipelines.

:mod:`.config` (what loading a model needs: the worker's settings reach the pipelines only as a
:class:`~worker.pipelines.config.ModelConfig`), :mod:`.session` (tensor specs, the ``Pipeline`` protocol,
sessions), :mod:`.manifest` (``model.json``), :mod:`.tensor` (tensor models, and
:func:`~worker.pipelines.tensor.load_pipeline`, which picks a pipeline for a folder), :mod:`.text`
(text-embedding models) with its pure steps in :mod:`.text_steps`.
"""
