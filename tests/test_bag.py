"""``lisa-agent bag``: round trip over generated rosbag2 files (sqlite3 and MCAP) with rosbags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_result_schema
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from lisa_agent.cli import main as cli_main
from ros_nodes.conversions import encode_jpeg, image_to_array, image_to_rgb

STORE = get_typestore(Stores.LATEST)
Image = STORE.types["sensor_msgs/msg/Image"]
CompressedImage = STORE.types["sensor_msgs/msg/CompressedImage"]
String = STORE.types["std_msgs/msg/String"]
Header = STORE.types["std_msgs/msg/Header"]
Time = STORE.types["builtin_interfaces/msg/Time"]
SIZE = (48, 64)
T0 = 1_700_000_000_000_000_000


def frames(n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, size=(*SIZE, 3), dtype=np.uint8) for _ in range(n)]


def header(i: int) -> object:
    ns = T0 + i * 33_333_333
    return Header(stamp=Time(sec=ns // 10**9, nanosec=ns % 10**9), frame_id="cam_optical")


def image(rgb: np.ndarray, i: int, encoding: str = "rgb8", pad: int = 0) -> object:
    pixels = rgb if encoding == "rgb8" else rgb[:, :, ::-1]
    rows = np.zeros((SIZE[0], SIZE[1] * 3 + pad), dtype=np.uint8)
    rows[:, : SIZE[1] * 3] = pixels.reshape(SIZE[0], -1)
    return Image(header=header(i), height=SIZE[0], width=SIZE[1], encoding=encoding, is_bigendian=0,
                 step=rows.shape[1], data=rows.reshape(-1))


def write_bag(path, storage: StoragePlugin, rgbs, *, compressed: bool = False) -> list[int]:
    """A bag with the frames on /camera/image (every other one bgr8 with padded rows) plus a chatter topic.

    Returns the log timestamps of the frames."""
    times = []
    with Writer(path, version=9, storage_plugin=storage) as writer:
        kind = CompressedImage if compressed else Image
        cam = writer.add_connection("/camera/image", kind.__msgtype__, typestore=STORE)
        chat = writer.add_connection("/chatter", String.__msgtype__, typestore=STORE)
        for i, rgb in enumerate(rgbs):
            t = T0 + i * 33_333_333 + 5_000_000  # logged 5 ms after the stamp, as a recorder would
            if compressed:
                msg = CompressedImage(header=header(i), format="jpeg",
                                      data=np.frombuffer(encode_jpeg(rgb), dtype=np.uint8))
            else:
                msg = image(rgb, i, "bgr8" if i % 2 else "rgb8", pad=4 if i % 2 else 0)
            writer.write(cam, t, STORE.serialize_cdr(msg, kind.__msgtype__))
            writer.write(chat, t + 1, STORE.serialize_cdr(String(data=f"hello {i}"), String.__msgtype__))
            times.append(t)
    return times


def read_bag(path) -> dict[str, list[tuple[int, object]]]:
    out: dict[str, list[tuple[int, object]]] = {}
    with Reader(path) as reader:
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, STORE.deserialize_cdr(raw, conn.msgtype)))
    return out


@pytest.mark.parametrize("storage,suffix", [(StoragePlugin.SQLITE3, ".db3"), (StoragePlugin.MCAP, ".mcap")])
def test_bag_round_trip(tmp_path, tiny_checkpoint, tiny_segmenter, storage, suffix, capsys):
    rgbs = frames()
    times = write_bag(tmp_path / "in", storage, rgbs)
    out = tmp_path / "out"
    code = cli_main(["bag", str(tmp_path / "in"), "--image-topic", "/camera/image", "--query", "the knife",
                     "--out", str(out), "--model", str(tiny_checkpoint)])
    assert code == 0, capsys.readouterr()
    assert "4/4 frames segmented" in capsys.readouterr().out
    assert any(p.suffix == suffix for p in out.iterdir())  # same storage as the input
    bag = read_bag(out)
    assert set(bag) == {"/lisa/mask", "/lisa/overlay", "/lisa/result"}
    for topic in bag:
        assert [t for t, _ in bag[topic]] == times, topic  # log times of the source frames
    for i, ((_, mask), (_, overlay), (_, result)) in enumerate(zip(bag["/lisa/mask"], bag["/lisa/overlay"],
                                                                   bag["/lisa/result"], strict=True)):
        want = header(i)
        for msg in (mask, overlay):
            assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (want.stamp.sec, want.stamp.nanosec)
            assert msg.header.frame_id == "cam_optical" and (msg.height, msg.width) == SIZE
        assert (mask.encoding, overlay.encoding) == ("mono8", "rgb8")
        payload = assert_result_schema(json.loads(result.data))  # the one result schema + the bag's envelope
        assert payload["stamp"] == {"sec": want.stamp.sec, "nanosec": want.stamp.nanosec}
        assert payload["frame_id"] == "cam_optical"
        assert payload["frame_index"] == i and payload["query"] == "the knife"
        # the bag's frame was decoded exactly (bgr8 + padding too): same mask as the engine on the pixels
        expected = tiny_segmenter.segment(rgbs[i], "the knife").masks
        labels = image_to_array(mask)
        want_labels = np.zeros(SIZE, np.uint8)
        for k, m in enumerate(expected):
            want_labels[m] = k + 1
        np.testing.assert_array_equal(labels, want_labels)
        assert [m["area"] for m in payload["masks"]] == [int(m.sum()) for m in expected]
        np.testing.assert_array_equal(image_to_rgb(overlay).shape, (*SIZE, 3))


def test_bag_compressed_input_every_other_frame_to_mcap_with_copy(tmp_path, tiny_segmenter):
    from lisa_agent.integrations.bagtool import process_bag

    times = write_bag(tmp_path / "in", StoragePlugin.SQLITE3, frames(5), compressed=True)
    seen = []
    report = process_bag(tmp_path / "in", tmp_path / "out", image_topic="/camera/image", query="a cup",
                         backend=tiny_segmenter, every=2, storage="mcap", overlay=False, copy_input=True,
                         progress=lambda i, r: seen.append(i))
    assert (report.frames, report.processed, seen) == (5, 3, [0, 2, 4])
    bag = read_bag(tmp_path / "out")
    assert any(p.suffix == ".mcap" for p in (tmp_path / "out").iterdir())
    assert set(bag) == {"/lisa/mask", "/lisa/result", "/camera/image", "/chatter"}
    assert [t for t, _ in bag["/lisa/mask"]] == [times[0], times[2], times[4]]
    assert len(bag["/camera/image"]) == 5 and len(bag["/chatter"]) == 5  # copied unchanged
    assert bag["/chatter"][3][1].data == "hello 3"


def test_bag_errors_are_clear(tmp_path, tiny_checkpoint, capsys):
    write_bag(tmp_path / "in", StoragePlugin.SQLITE3, frames(1))
    args = ["bag", str(tmp_path / "in"), "--query", "a cup", "--model", str(tiny_checkpoint)]
    assert cli_main([*args, "--image-topic", "/nope", "--out", str(tmp_path / "o1")]) == 1
    err = capsys.readouterr().err
    assert "no topic '/nope'" in err and "/camera/image" in err  # names the image topics that exist
    assert cli_main([*args, "--image-topic", "/chatter", "--out", str(tmp_path / "o2")]) == 1
    assert "std_msgs/msg/String, not an image" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert cli_main([*args, "--image-topic", "/camera/image", "--out", str(tmp_path / "exists")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["bag", str(tmp_path / "missing"), "--query", "x", "--image-topic", "/a", "--out",
                     str(tmp_path / "o3"), "--model", str(tiny_checkpoint)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_bag_skips_undecodable_frames_and_reports_them(tmp_path, tiny_segmenter):
    from lisa_agent.integrations.bagtool import process_bag

    with Writer(tmp_path / "in", version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        cam = writer.add_connection("/cam", Image.__msgtype__, typestore=STORE)
        good = image(frames(1)[0], 0)
        bad = image(frames(1)[0], 1)
        bad.encoding = "yuv422"
        for i, msg in enumerate((good, bad)):
            writer.write(cam, T0 + i, STORE.serialize_cdr(msg, Image.__msgtype__))
    report = process_bag(tmp_path / "in", tmp_path / "out", image_topic="/cam", query="a cup",
                         backend=tiny_segmenter)
    assert report.processed == 1 and len(report.skipped) == 1 and "yuv422" in report.skipped[0]
    assert len(read_bag(tmp_path / "out")["/lisa/mask"]) == 1
