"""Integrations of LISA with agent frameworks.

- :mod:`lisa_agent.integrations.langchain`: ``LisaSegmentTool`` (``segment_objects``),
  ``LisaExplainTool`` (``explain_objects``) and ``lisa_tools(...)`` for LangChain / LangGraph agents
  (needs ``langchain-core``; imported only when that module is).
- :mod:`lisa_agent.integrations.images`: load an image named by a file path, URL or data URI.
"""
