"""Shared test utilities (no fixtures here; see conftest.py)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def random_frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic HxWx3 uint8 RGB frame with some structure (blocks + noise)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    img[h // 4: h // 2, w // 3: w // 2] = (200, 30, 30)
    return img


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def teach_answer(seg, image: np.ndarray, query: str, answer: str, steps: int = 80) -> None:  # noqa: ANN001
    """Overfit the LLM of a tiny segmenter so that greedy decoding answers ``answer`` to ``query``.

    Gives random-weight tiny models a deterministic answer containing [SEG], so the chat, reference
    and fast paths can be compared on real [SEG] states.
    """
    from lisa_agent.engine.preprocess import clip_preprocess

    model = seg.model
    tok = seg.tokenizer
    prompt_ids = tok.encode_prompt(seg._prompt(query))
    full_ids = tok.encode_prompt(seg._prompt(query, answer=answer))
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():  # the engine's device: a CUDA model is taught with CUDA tensors
        image_tokens = model.encode_clip(clip_preprocess(image, seg.clip_size).to(seg.device))
    ids = torch.tensor([full_ids], device=seg.device)
    model.llm.requires_grad_(True)
    opt = torch.optim.Adam(model.llm.parameters(), lr=1e-2)
    n_img = image_tokens.shape[1]
    start = len(prompt_ids) - 1 + n_img - 1  # merged position predicting the first answer token
    targets = ids[0, len(prompt_ids):]
    torch.manual_seed(0)
    for _ in range(steps):
        embeds, _ = model.embed_with_image(ids, image_tokens)
        hidden = model.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]
        logits = model.llm.lm_head(hidden[start: start + len(targets)])
        loss = torch.nn.functional.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.llm.requires_grad_(False)
    seg.clear_cache()


def assert_same_result(a, b, *, atol: float = 1e-4) -> None:  # noqa: ANN001
    """Two SegmentationResults of one query agree: ids, text, [SEG] prompts (``atol``), logits (10 x ``atol``),
    masks (IoU >= 0.99 each)."""
    assert a.output_ids == b.output_ids
    assert a.text == b.text
    assert len(a.masks) == len(b.masks)
    np.testing.assert_allclose(a.seg_embeddings, b.seg_embeddings, atol=atol, rtol=atol)
    if a.logits is not None or b.logits is not None:
        np.testing.assert_allclose(a.logits, b.logits, atol=10 * atol, rtol=10 * atol)
    for x, y in zip(a.masks, b.masks, strict=True):
        assert iou(x, y) >= 0.99


def assert_same_objects(reference, other, first_seed: int, *, min_same: int = 11, mean_iou: float = 0.97,  # noqa: ANN001
                        min_iou: float = 0.9) -> list[float]:
    """``other`` answers 12 chat queries on 3 tabletop validation scenes as ``reference`` does: at least
    ``min_same`` answers the same, and the masks of matching answers with IoU mean >= ``mean_iou``, min >=
    ``min_iou`` (at least 8 of them). Returns the IoUs."""
    from lisa_agent.data.queries import queries_for_scene
    from lisa_agent.data.tabletop import render_scene, split_seed

    ious, same_text, compared = [], 0, 0
    for k in range(3):
        scene = render_scene(split_seed("val", first_seed + k), size=(240, 320))
        for q in queries_for_scene(scene)[:4]:
            ours = reference.segment(scene.image, q.text, mode="chat", max_new_tokens=32)
            theirs = other.segment(scene.image, q.text, mode="chat", max_new_tokens=32)
            compared += 1
            same_text += ours.text == theirs.text
            if len(ours.masks) and len(theirs.masks) == len(ours.masks):
                ious.extend(iou(a, b) for a, b in zip(ours.masks, theirs.masks, strict=True))
    assert compared == 12 and same_text >= min_same, (same_text, ious)
    assert len(ious) >= 8 and min(ious) >= min_iou and float(np.mean(ious)) >= mean_iou, ious
    return ious


def assert_result_schema(payload: dict) -> dict:
    """``payload`` (a door's output: the result schema plus that door's envelope keys) must be strict JSON
    and valid against lisa_agent/schemas/result.schema.json; returns it re-read from JSON."""
    import json

    import jsonschema

    from lisa_agent.result import RESULT_SCHEMA_PATH

    text = json.dumps(payload, allow_nan=False)  # NaN / inf / numpy types would fail here
    schema = json.loads(RESULT_SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    decoded = json.loads(text)
    jsonschema.Draft202012Validator(schema).validate(decoded)
    return decoded


@contextlib.contextmanager
def serve_png(body: bytes, redirects: dict[str, str] | None = None) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` answering every GET with ``body`` as image/png, except the paths in
    ``redirects`` (path -> Location, answered 302); stops when the block ends."""
    targets = dict(redirects or {})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path in targets:
                self.send_response(302)
                self.send_header("Location", targets[self.path])
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def http_call(port: int, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = 180.0) -> tuple[int, dict[str, str], Any]:
    """One HTTP request to 127.0.0.1:``port``: (status, lower-cased headers, JSON body or bytes). ``body`` is sent
    as JSON (with its content type unless ``headers`` say otherwise), ``raw`` as given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    sent = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        payload = response.read()
        got = {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    if got.get("content-type", "").startswith("application/json"):
        return response.status, got, json.loads(payload)
    return response.status, got, payload


def ws_handshake(port: int, *, receive_buffer: int | None = None, timeout: float = 30.0) -> socket.socket:
    """A raw socket that has completed the console's WebSocket upgrade on ``/ws`` (asserts the 101 reply).

    ``receive_buffer`` (bytes) shrinks SO_RCVBUF, for tests of a client that stops reading.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def force_generation(backend, monkeypatch, text: str) -> list:  # noqa: ANN001
    """Replace a reasoner's generation (only: the rest of its path runs) by ``text``'s tokens followed by EOS, as
    a trained model would write them; returns the kwargs of each call to ``generate``."""
    tok = backend.processor.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    calls = []

    def generate(**kwargs):  # noqa: ANN003, ANN202
        calls.append(kwargs)
        prompt = kwargs["input_ids"]
        return torch.cat([prompt, torch.tensor([ids], dtype=prompt.dtype)], dim=1)

    monkeypatch.setattr(backend.model, "generate", generate)
    return calls
