"""Integrations of LISA with agent frameworks.

- :mod:`lisa_agent.integrations.langchain`: ``LisaSegmentTool`` (``segment_objects``),
  ``LisaExplainTool`` (``explain_objects``) and ``lisa_tools(...)`` for LangChain / LangGraph agents
  (needs ``langchain-core``; imported only when that module is).
- :mod:`lisa_agent.integrations.mcp`: ``build_server(session)``, the MCP server (``look``, ``segment_objects``,
  ``explain_objects``, ``track``; needs the ``mcp`` SDK 2.x, imported only when that module is), over a
  :class:`~lisa_agent.integrations.tool_session.ToolSession` (the model, the frame source, the tracking stream);
  :mod:`lisa_agent.integrations.mcp_http`: its streamable-HTTP transport behind the access rule.
- :mod:`lisa_agent.integrations.tool_io`: what every tool door says to the calling model (descriptions,
  argument help, the answer's text).
- :mod:`lisa_agent.integrations.images`: load an image named by a file path, URL or data URI.
"""
