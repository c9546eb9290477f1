"""The LISA engine: LLaVA (LLaMA + CLIP) with a ``[SEG]`` token whose hidden state prompts SAM's mask decoder.

:class:`~lisa_agent.engine.segmenter.LisaSegmenter` is the backend: its frame side is
:mod:`~lisa_agent.engine.encoding`, its language side :mod:`~lisa_agent.engine.answering`, its device and
precision :mod:`~lisa_agent.engine.device`. The modules beside it load the published checkpoints
(:mod:`~lisa_agent.engine.loading`, with :mod:`~lisa_agent.engine.weights`, :mod:`~lisa_agent.engine.build` and
:mod:`~lisa_agent.engine.quantization`) and write them (:mod:`~lisa_agent.engine.checkpoints`), build prompts and
tokenize (:mod:`~lisa_agent.engine.prompts`, :mod:`~lisa_agent.engine.tokenization`), run the language model
(:mod:`~lisa_agent.engine.generation`, :mod:`~lisa_agent.engine.acceleration`), prepare frames
(:mod:`~lisa_agent.engine.preprocess`) and keep their features (:mod:`~lisa_agent.engine.features`);
:mod:`~lisa_agent.engine.modeling` holds the networks. A second backend sits beside this package and shares
only the vocabulary at the package root (frames, options, results, errors, backend).
"""
