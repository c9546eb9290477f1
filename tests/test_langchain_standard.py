"""LangChain's standard tool suites (``langchain-tests``) run against LisaSegmentTool on the tiny model.

The unit suite checks construction, the name and the input schema against the example call; the
integration suite invokes the tool (sync and async, with and without a ToolCall) on the tiny
random-weight LISA checkpoint and a fixed camera frame, and checks the ToolMessage it returns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests

from lisa_agent.integrations.langchain import LisaSegmentTool

# The integration suite has async tests: the anyio marker runs them on asyncio (sync tests ignore it).
pytestmark = pytest.mark.anyio


def _frame() -> np.ndarray:
    """A fixed 96x128 RGB frame: grey table, a dark bar (handle) and a bright blade."""
    img = np.full((96, 128, 3), 150, dtype=np.uint8)
    img[40:52, 20:60] = (60, 40, 30)
    img[42:50, 60:110] = (220, 220, 230)
    return img


class _WithTinyBackend:
    """Mixin: construct the tool around the session's tiny segmenter and a fixed-frame camera."""

    _segmenter: Any = None

    @pytest.fixture(autouse=True)
    def _use_tiny_segmenter(self, tiny_segmenter: Any) -> None:
        type(self)._segmenter = tiny_segmenter

    @property
    def tool_constructor(self) -> type[LisaSegmentTool]:
        return LisaSegmentTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        frame = _frame()
        return {"backend": self._segmenter, "image_source": lambda: frame}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"query": "something to cut with"}


class TestLisaSegmentToolUnit(_WithTinyBackend, ToolsUnitTests):
    pass


class TestLisaSegmentToolIntegration(_WithTinyBackend, ToolsIntegrationTests):
    pass
