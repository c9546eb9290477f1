"""LISA's modules: LLaMA (transformers) + CLIP tower + projector + SAM (segment_anything) + text_hidden_fcs."""
