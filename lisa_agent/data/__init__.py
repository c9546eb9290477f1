"""Data: the synthetic tabletop world and the ReasonSeg folder layout.

- :mod:`lisa_agent.data.tabletop`: procedurally drawn tabletop scenes (deterministic from a seed).
- :mod:`lisa_agent.data.knowledge`: the world's knowledge base of colours, categories and affordances.
- :mod:`lisa_agent.data.silhouettes`: each category's silhouette as polygons, and polygon <-> mask helpers.
- :mod:`lisa_agent.data.queries`: the query generator (LISA training / evaluation samples of a scene).
- :mod:`lisa_agent.data.reasonseg`: reader and writer of the ReasonSeg layout (``x.jpg`` +
  LabelMe-style ``x.json``), read exactly as LISA reads it.
- :mod:`lisa_agent.data.refcoco`: reader and writer of the RefCOCO layout (``refs(unc).p`` +
  ``instances.json`` + COCO images; RefCOCO, RefCOCO+, RefCOCOg, refclef), read as LISA reads it.
- :mod:`lisa_agent.data.coco_masks`: COCO polygons / RLE <-> masks (LISA's decoding, exact encodings).
- :mod:`lisa_agent.data.plain_pickle`: a restricted unpickler for data pickles (plain values only).
"""
