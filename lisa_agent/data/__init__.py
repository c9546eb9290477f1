"""Data: the synthetic tabletop world and the ReasonSeg folder layout.

- :mod:`lisa_agent.data.tabletop`: procedurally drawn tabletop scenes (deterministic from a seed),
  a small knowledge base of categories, colours and affordances, and the query generator.
- :mod:`lisa_agent.data.reasonseg`: reader and writer of the ReasonSeg layout (``x.jpg`` +
  LabelMe-style ``x.json``), read exactly as LISA reads it.
"""
