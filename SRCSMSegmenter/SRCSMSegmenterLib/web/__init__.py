"""The ``srcsm web`` front end: the module's workflow in a browser, on trame-slicer.

Split like trame-slicer itself, one job per module:

* :mod:`.datafolder` — the only folder the page may read or write (paths confined, uploads limited,
  output names reserved); plain Python.
* :mod:`.charts` — the source-matching histograms and mapping curve as SVG, from the tables
  :func:`..matching_plot.update_matching_plots` fills for the Slicer module; plain Python.
* :mod:`.workflow` — load → preview → segment → save on an MRML scene, through
  :class:`..module_logic.SRCSMModuleLogic` (no second implementation of any step); needs slicer-core,
  not trame.
* :mod:`.app` — the trame application: trame-slicer's scene, views and segment editor, composed with
  one logic class per feature of the page, as trame-slicer's own apps are built:
  :mod:`.load_logic` (list, upload, load), :mod:`.preview_logic` (source-matching preview),
  :mod:`.segment_logic` (background job, progress, cancel), :mod:`.save_logic` (saving); they share
  :mod:`.page` (state names, messages); :mod:`.views` (layout, linked preview) and :mod:`.ui` (widgets).
* :mod:`.server` — ``srcsm web``: interface checks, then serve.

Only the trame modules (:mod:`.app` and what it imports) need trame, and only ``srcsm web`` imports
them, lazily (:mod:`.server`'s ``serve``): importing
``SRCSMSegmenterLib`` (or the ``srcsm`` command) never needs the ``web`` extra.
"""
