"""Hardening (issue 15): no request can starve the model, poison another caller's results, or crash a
door. One test (or more) per defect found by probing the doors as an attacker and a careless user."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from helpers import random_frame, teach_answer

from lisa_agent import LisaSegmenter
from lisa_agent.benchmarks.server import EchoBackend, synthetic_frame
from lisa_agent.cli import main
from lisa_agent.errors import Code, InvalidQueryError, LimitExceededError, ProtocolError
from lisa_agent.options import QueryOptions
from lisa_agent.serving.client import LisaClient
from lisa_agent.serving.codecs import encode_depth, encode_image
from lisa_agent.serving.framing import build_header
from lisa_agent.serving.protocol import Request
from lisa_agent.serving.server import LisaServer

ANY_PORT = "tcp://127.0.0.1:*"


class Peer:
    """A raw DEALER socket: send any frames, read replies when (and if) the test wants to."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([b"", *frames])

    def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.sock.poll(timeout * 1000), "no reply from the server"
        return json.loads(self.sock.recv_multipart()[1])

    def close(self) -> None:
        self.sock.close(0)


def _wait_until(predicate: Any, timeout: float = 300.0) -> None:
    """Wait for an event; ``timeout`` only bounds a test that would otherwise hang."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "the awaited event did not happen"
        time.sleep(0.01)


def _segment(rid: str, image: np.ndarray, query: str = "the cup", raw_header: dict[str, Any] | None = None,
             **fields: Any) -> list[bytes]:
    spec, data = encode_image(image)
    if raw_header is None:
        return [build_header(rid, "segment", query=query, image=spec, **fields), data]
    header = {"v": 2, "id": rid, "op": "segment", "query": query, "image": spec, **raw_header}
    return [json.dumps(header).encode(), data]


@pytest.fixture
def seg(tiny_checkpoint) -> LisaSegmenter:
    return LisaSegmenter.from_pretrained(tiny_checkpoint, device="cpu")


# ------------------------------------------------------------------------ 1. masks and work per request


def test_1_a_forced_answer_with_too_many_seg_is_refused_before_the_model_runs(seg):
    frame = random_frame(96, 128, seed=1)
    with pytest.raises(LimitExceededError, match="has 17 \\[SEG\\]; at most 16 masks per answer") as exc:
        seg.segment(frame, "everything", answer=" ".join(["[SEG]"] * 17))
    assert exc.value.code == "too_large"
    assert len(seg.segment(frame, "everything", answer=" ".join(["[SEG]"] * 16))) == 16


def test_1_the_mask_work_per_request_is_bounded_by_frame_pixels_times_views(tiny_checkpoint):
    # 480x640 = 0.31 Mpx per mask and view; hflip doubles it: 1.5 Mpx allows 2 masks
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint, device="cpu", mask_tta="hflip", max_mask_megapixels=1.5)
    frame = random_frame(480, 640, seed=2)
    assert len(seg.segment(frame, "two", answer="[SEG] [SEG]")) == 2
    with pytest.raises(LimitExceededError, match="at most 2 masks per answer on a 480x640 frame with 2 view"):
        seg.segment(frame, "three", answer="[SEG] [SEG] [SEG]")


def test_1_one_mask_budget_for_the_engine_and_both_servers():
    from lisa_agent.config import mask_budget

    assert mask_budget(16, 256.0, 4, 480, 640) == 16  # 1.23 Mpx a mask: 208 fit, max_masks caps
    assert mask_budget(16, 1.5, 2, 480, 640) == 2  # 0.61 Mpx a mask
    assert mask_budget(16, 1.0, 1, 1080, 1920) == 0  # not even one
    req = Request(id=7, op="segment", image_spec={"format": "raw", "shape": [480, 640, 3]},
                  query_options=QueryOptions(answer="[SEG] [SEG] [SEG]"))
    info = {"max_masks": 16, "max_mask_megapixels": 1.5, "mask_views": 2}
    with pytest.raises(ProtocolError, match="has 3 \\[SEG\\]; the model makes at most 2 masks") as exc:
        req.check_mask_budget(info)
    assert (exc.value.code, exc.value.request_id) == ("too_large", 7)
    Request(id=8, op="segment", image_spec={"format": "jpeg"}, query_options=QueryOptions(answer="[SEG] [SEG] [SEG]")
            ).check_mask_budget(info)  # size unknown before decoding: max_masks only; the engine checks again


def test_1_generation_stops_emitting_seg_at_the_limit(tiny_checkpoint):
    seg = LisaSegmenter.from_pretrained(tiny_checkpoint, device="cpu", max_masks=2)
    frame = random_frame(64, 80, seed=3)
    teach_answer(seg, frame, "all of them", "[SEG] [SEG] [SEG] [SEG]")
    unbounded = LisaSegmenter(seg.model, seg.tokenizer, template=seg.template.name, max_masks=16)
    assert unbounded.segment(frame, "all of them", mode="chat", max_new_tokens=8).text.count("[SEG]") == 4
    for mode in ("chat", "reference"):
        result = seg.segment(frame, "all of them", mode=mode, max_new_tokens=8)
        assert result.text.count("[SEG]") == 2 and len(result) == 2, mode


def test_1_the_server_refuses_too_many_seg_before_queueing():
    backend = EchoBackend()
    backend.info = lambda: {"model": "echo", "max_masks": 16, "max_mask_megapixels": 256.0,  # type: ignore[method-assign]
                            "mask_views": 4}
    with LisaServer(backend, ANY_PORT) as server:
        peer = Peer(server.endpoint)
        try:
            peer.send(_segment("many", synthetic_frame(48, 64), options={"answer": " ".join(["[SEG]"] * 666)}))
            reply = peer.recv()
        finally:
            peer.close()
    assert reply["id"] == "many" and reply["error"]["code"] == Code.TOO_LARGE
    assert "666 [SEG]" in reply["error"]["message"] and backend.calls == []  # the model never ran


# ------------------------------------------------------------------------ 2. no features from other pixels


def test_2_a_frame_sent_under_another_clients_frame_id_gets_its_own_masks(tiny_segmenter):
    knife = random_frame(96, 128, seed=4)
    black = np.zeros_like(knife)
    with LisaServer(tiny_segmenter, ANY_PORT) as server, LisaClient(server.endpoint, timeout=30) as a:
        first = a.segment(knife, "the knife", frame_id="cam0/1")
        b = Peer(server.endpoint)
        try:  # another client reuses A's stream name and frame id for other pixels
            b.send(_segment("b1", black, "the knife", options={"frame_id": "cam0/1", "stream": a.stream}))
            reply = b.recv()
        finally:
            b.close()
    assert reply["ok"] and reply["result"]["frame_id"] == "cam0/1"
    tiny_segmenter.clear_cache()
    expected = tiny_segmenter.segment(black, "the knife").to_dict()["masks"]
    assert [m["rle"] for m in reply["result"]["masks"]] == [m["rle"] for m in expected]
    assert [m["rle"] for m in reply["result"]["masks"]] != [m["rle"] for m in first.to_dict()["masks"]]


# ------------------------------------------------------------------------ 4. one line, a documented exit code


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_4_an_output_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys):
    Path(tmp_path / "frame.png").write_bytes(b"")
    (tmp_path / "afile").write_text("x")
    base = ["segment", "--model", "/nonexistent/model", "--image", str(tmp_path / "frame.png"), "--query", "q"]
    assert main([*base, "--out", str(tmp_path / "afile" / "o.png")]) == 1
    err = _one_line(capsys)
    assert "--out" in err and "not a writable folder" in err
    assert main([*base, "--mask-out", str(tmp_path)]) == 1
    err = _one_line(capsys)
    assert "--mask-out" in err and "is a folder" in err
    assert main(["eval", "--model", "/nonexistent", "--data", str(tmp_path), "--out", str(tmp_path / "afile" / "x")]) == 1
    assert "--out" in _one_line(capsys)


@pytest.mark.parametrize("damage", ["vision tower weights", "vision tower config", "tokenizer"])
def test_4_a_damaged_checkpoint_file_is_one_line(tiny_checkpoint, tmp_path, capsys, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint, folder)
    target = {"vision tower weights": folder / "vision_tower" / "model.safetensors",
              "vision tower config": folder / "vision_tower" / "config.json",
              "tokenizer": folder / "tokenizer.json"}[damage]
    target.write_bytes(b"\x00garbage{")
    Path(tmp_path / "f.png").write_bytes(_png(random_frame(32, 32)))
    assert main(["segment", "--model", str(folder), "--image", str(tmp_path / "f.png"), "--query", "q"]) == 1
    err = _one_line(capsys)
    assert ("vision tower" if "vision" in damage else "tokenizer") in err and str(folder) in err


def test_4_serve_refuses_nan_limits(capsys):
    for flag in ("--max-frame-mb", "--max-pending-replies-mb"):
        assert main(["serve", "--model", "/nonexistent", flag, "nan"]) == 1
        assert f"{flag} must be a positive number" in _one_line(capsys)


def test_4_an_unexpected_failure_is_one_line_with_exit_code_3(monkeypatch, capsys):
    import lisa_agent.commands.make_tiny as make_tiny

    def broken(args: Any) -> int:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(make_tiny, "run", broken)
    assert main(["make-tiny", "/tmp/x"]) == 3
    err = _one_line(capsys)
    assert "internal error: RuntimeError: something nobody expected" in err


def _png(rgb: np.ndarray) -> bytes:
    from lisa_agent.encoders import image_to_png

    return image_to_png(rgb)


# ------------------------------------------------------------------------ 5. prompts that do not fit


def test_5_a_prompt_longer_than_the_context_is_refused_with_the_limit(seg):
    frame = random_frame(64, 80, seed=5)
    query = "grab something to cut with " * 2000  # 54 KB
    layers: list[int] = []
    hook = seg.model.llm.model.layers[0].register_forward_hook(lambda *_: layers.append(1))
    try:
        for mode in ("fast", "chat"):
            with pytest.raises(InvalidQueryError, match="at most 512 \\(its max_position_embeddings\\)") as exc:
                seg.segment(frame, query, mode=mode)
            assert f"it is {len(query.strip())} characters" in str(exc.value) and len(str(exc.value)) < 400
    finally:
        hook.remove()
    assert layers == []  # refused before the LLM ran (it took 8-10 s to answer)
    # a chat answer ends where the context does
    fits = "grab something to cut with " * 20
    result = seg.segment(frame, fits, mode="chat", max_new_tokens=4096)
    assert len(result.output_ids) + len(result.input_ids) - 1 + 4 <= seg.max_positions  # 4 = tiny CLIP tokens


def test_5_the_tool_does_not_echo_a_huge_query(tiny_segmenter):
    from langchain_core.messages import ToolMessage

    from lisa_agent.integrations.langchain import LisaSegmentTool

    frame = random_frame(64, 80, seed=6)
    tool = LisaSegmentTool(backend=tiny_segmenter, image_source=lambda: frame)
    query = "where is the thing " * 3000
    msg = tool.invoke({"name": tool.name, "args": {"query": query}, "id": "c1", "type": "tool_call"})
    assert isinstance(msg, ToolMessage) and msg.status == "error"
    assert "max_position_embeddings" in msg.content and len(msg.content) < 600


# ------------------------------------------------------------------------ 6. overflowing numbers, surrogates


@pytest.mark.parametrize(("raw", "where"), [
    ({"timeout_ms": 10**400}, "timeout_ms"),
    ({"options": {"intrinsics": [10**400, 1.0, 2.0, 3.0]}}, "intrinsics"),
    ({"depth": {"shape": [48, 64], "dtype": "uint16", "scale": 10**400}}, "depth.scale"),
])
def test_6_overflowing_numbers_are_invalid_argument_with_the_request_id(raw, where):
    with LisaServer(EchoBackend(), ANY_PORT) as server:
        peer = Peer(server.endpoint)
        try:
            frames = _segment("big-number", synthetic_frame(48, 64), raw_header=raw)
            if "depth" in raw:
                frames.append(encode_depth(np.zeros((48, 64), np.uint16))[1])
            peer.send(frames)
            reply = peer.recv()
        finally:
            peer.close()
        assert reply["id"] == "big-number" and reply["error"]["code"] == Code.INVALID_ARGUMENT
        assert where in reply["error"]["message"] and server.health()["replies"].get("internal", 0) == 0


def test_6_a_lone_surrogate_in_the_query_is_invalid_argument_with_the_request_id():
    with LisaServer(EchoBackend(), ANY_PORT) as server:
        peer = Peer(server.endpoint)
        try:
            peer.send(_segment("surrogate", synthetic_frame(48, 64), query="the cup \ud800"))
            reply = peer.recv()
        finally:
            peer.close()
    assert reply["id"] == "surrogate" and reply["error"]["code"] == Code.INVALID_ARGUMENT
    assert "lone surrogate" in reply["error"]["message"]


def test_6_the_engine_refuses_a_lone_surrogate_too(seg):
    with pytest.raises(InvalidQueryError, match="not valid Unicode"):
        seg.segment(random_frame(32, 32), "cup \udc80")


# ------------------------------------------------------------------------ 7. a client that never reads


def test_7_replies_a_client_never_reads_are_bounded_in_bytes_and_the_oldest_dropped(tiny_segmenter, caplog):
    """12 requests with 4 MB of logits each to a client that never reads: the server holds at most its
    limit (plus what ZeroMQ and the kernel buffer), drops the oldest, logs the count, and keeps serving."""
    frame = random_frame(1024, 1024, seed=7)
    limit = 8 * 1024 * 1024
    with LisaServer(tiny_segmenter, ANY_PORT, max_pending_reply_bytes=limit) as server:
        sleeper = zmq.Context.instance().socket(zmq.DEALER)
        sleeper.linger = 0
        sleeper.setsockopt(zmq.RCVHWM, 1)
        sleeper.setsockopt(zmq.RCVBUF, 64 * 1024)
        sleeper.connect(server.endpoint)
        try:
            for k in range(12):
                sleeper.send_multipart([b"", *_segment(f"r{k}", frame, options={"return_logits": True})])
            _wait_until(lambda: server.health()["replies"].get("ok", 0) == 12)  # all 12 answered by the model
            _wait_until(lambda: server.health()["replies"].get("replies_dropped", 0) >= 1)  # the oldest dropped
            health = server.health()
            assert health["pending_reply_bytes"] <= limit + 4.5 * 1024 * 1024  # the limit plus one reply
            assert any("does not read its replies: dropped its" in r.getMessage() for r in caplog.records)
            # another client is served meanwhile
            with LisaClient(server.endpoint, timeout=30) as other:
                assert other.segment(random_frame(48, 64), "the cup").text
            # the sleeper wakes up: each reply at most once, in order, the newest kept; the ones dropped are
            # the oldest the server still held (earlier ones had already gone into ZeroMQ's and the kernel's buffers)
            got: list[str] = []
            while "r11" not in got:  # the newest is never dropped, and it comes last
                assert sleeper.poll(60_000), f"no more replies after {got}"
                got.append(json.loads(sleeper.recv_multipart()[1])["id"])
            dropped = server.health()["replies"]["replies_dropped"]  # final: every reply has been handed over
        finally:
            sleeper.close(0)
    numbers = [int(rid[1:]) for rid in got]
    assert numbers == sorted(set(numbers)) and numbers[-1] == 11
    assert len(got) + dropped == 12
    missing = sorted(set(range(12)) - set(numbers))
    assert missing == list(range(missing[0], missing[0] + dropped))  # one run: the oldest held ones


# ------------------------------------------------------------------------ 10. a retried request


def test_10_a_request_whose_client_gave_up_is_not_run(tiny_segmenter):
    """The client's per-attempt timeout is the request's timeout_ms: when it retries, the first copy,
    still queued, is answered deadline_exceeded and never run (at most the one already running runs)."""
    gate = threading.Event()
    backend = EchoBackend(gate=gate)
    with LisaServer(backend, ANY_PORT) as server:
        with LisaClient(server.endpoint, timeout=0.3, retries=1) as client:
            blocker = Peer(server.endpoint)
            try:
                blocker.send(_segment("hold", synthetic_frame(48, 64), "blocker"))  # occupies the worker
                _wait_until(lambda: server.health()["busy"])
                with pytest.raises(Exception, match="no reply"):  # both attempts give up while it is held
                    client.segment(synthetic_frame(48, 64, seed=1), "retried query")
                _wait_until(lambda: server.health()["queue_depth"] == 2)  # both copies arrived and wait
                seen = time.monotonic()
                _wait_until(lambda: time.monotonic() - seen > 0.3)  # each is past its timeout_ms (300 ms) now
                gate.set()  # the worker frees up
                assert blocker.recv()["id"] == "hold"
                _wait_until(lambda: server.health()["replies"].get(Code.DEADLINE_EXCEEDED, 0) == 2)
            finally:
                gate.set()
                blocker.close()
        assert [q for q, _ in backend.calls].count("retried query") == 0
        assert server.health()["replies"].get(Code.DEADLINE_EXCEEDED, 0) == 2
