"""The ``srcsm web`` front end: the module's workflow in a browser, on trame-slicer.

Split like trame-slicer itself, one job per module:

* :mod:`.datafolder` — the only folder the page may read or write (paths confined, uploads limited,
  output names reserved); plain Python.
* :mod:`.charts` — the source-matching histograms and mapping curve as SVG, from the tables
  :func:`..matching_plot.update_matching_plots` fills for the Slicer module; plain Python.
* :mod:`.workflow` — load → preview → segment → save on an MRML scene, through
  :class:`..module_logic.SRCSMModuleLogic` (no second implementation of any step); needs slicer-core,
  not trame.
* :mod:`.app` / :mod:`.ui` — the trame application (views, segment editor, the SRCSM panel).
* :mod:`.server` — ``srcsm web``: interface checks, then serve.

Only :mod:`.app`, :mod:`.ui` and :mod:`.server`'s ``serve`` import trame, lazily: importing
``SRCSMSegmenterLib`` (or the ``srcsm`` command) never needs the ``web`` extra.
"""
