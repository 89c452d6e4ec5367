"""SRCSMSegmenterLib — the Qt-free core of the SRCSMSegmenter extension.

Source matching, model packages, whole-volume inference and file IO. Nothing here imports Qt,
``slicer.app`` or a global MRML scene, so the same code drives the Slicer module, the ``srcsm``
command and the trainer.
"""

__version__ = "0.1.0"
