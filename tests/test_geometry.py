"""Median depth inside a mask, pinhole deprojection and grasp poses (lisa_agent/geometry.py, pure numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lisa_agent.geometry import (
    Intrinsics,
    deproject,
    depth_to_meters,
    mask_target,
    project,
)

K = Intrinsics(fx=525.0, fy=520.0, cx=319.5, cy=239.5)


def render_box_scene(size=(480, 640), intrinsics=K, table_z=1.2, box_center=(0.10, -0.05, 0.70),
                     box_half=(0.06, 0.04)):
    """Depth (metres) of a fronto-parallel wall at ``table_z`` with a box face at ``box_center``.

    Returns (depth HxW float32, box mask HxW bool, ground-truth centre of the visible face)."""
    h, w = size
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    x_at_box = (u - intrinsics.cx) * box_center[2] / intrinsics.fx
    y_at_box = (v - intrinsics.cy) * box_center[2] / intrinsics.fy
    box = (np.abs(x_at_box - box_center[0]) <= box_half[0]) & (np.abs(y_at_box - box_center[1]) <= box_half[1])
    depth = np.full(size, table_z, dtype=np.float32)
    depth[box] = box_center[2]
    return depth, box, np.array(box_center)


def test_intrinsics_from_camera_info_k():
    k = [525.0, 0.0, 319.5, 0.0, 520.0, 239.5, 0.0, 0.0, 1.0]
    assert Intrinsics.from_k(k) == K
    assert Intrinsics.from_k(np.array(k).reshape(3, 3)) == K


@pytest.mark.parametrize("k", [[0.0] * 9, [525.0, 0, 319.5, 0, -1.0, 239.5, 0, 0, 1], [1.0] * 8])
def test_intrinsics_refuses_unusable_k(k):
    with pytest.raises(ValueError):
        Intrinsics.from_k(k)


def test_deproject_known_values():
    assert deproject(K.cx, K.cy, 2.0, K) == (0.0, 0.0, 2.0)
    x, y, z = deproject(K.cx + 52.5, K.cy - 26.0, 1.0, K)
    assert (x, y, z) == pytest.approx((0.1, -0.05, 1.0))


@given(u=st.floats(0, 639), v=st.floats(0, 479), z=st.floats(0.1, 20.0))
def test_project_inverts_deproject(u, v, z):
    pu, pv = project(deproject(u, v, z, K), K)
    assert pu == pytest.approx(u, abs=1e-6) and pv == pytest.approx(v, abs=1e-6)


def test_depth_to_meters_units_and_invalid_pixels():
    mm = np.array([[0, 1000], [1500, 65535]], dtype=np.uint16)
    m = depth_to_meters(mm)
    assert m.dtype == np.float32
    assert math.isnan(m[0, 0]) and m[0, 1] == pytest.approx(1.0) and m[1, 0] == pytest.approx(1.5)
    f = depth_to_meters(np.array([[np.nan, np.inf], [-1.0, 0.75]], dtype=np.float32))
    assert np.isnan(f[0, 0]) and np.isnan(f[0, 1]) and np.isnan(f[1, 0]) and f[1, 1] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="uint16"):
        depth_to_meters(np.zeros((2, 2), dtype=np.int32))


def test_target_depth_ignores_holes_and_is_robust_to_edge_pixels():
    depth = np.full((10, 10), 0.8, dtype=np.float32)
    depth[0, :] = 3.0  # mask leaks onto the background at one edge row
    depth[5, 5] = np.nan  # sensor hole
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:6, 2:8] = True
    target = mask_target(depth, mask, None)
    assert target is not None and target.depth_m == pytest.approx(0.8) and target.point is None
    assert target.valid_pixels == 35  # the hole is not counted
    assert mask_target(depth, np.zeros_like(mask), None) is None
    with pytest.raises(ValueError, match="same HxW"):
        mask_target(depth, mask[:5], None)


def test_target_point_of_a_box_is_within_2cm_of_ground_truth():
    depth, box, truth = render_box_scene()
    target = mask_target(depth, box, K)
    assert target is not None
    assert np.linalg.norm(np.array(target.point) - truth) < 0.02
    assert target.depth_m == pytest.approx(0.70, abs=1e-6)
    assert target.valid_pixels == int(box.sum())


def test_target_point_survives_a_sloppy_mask_and_holes():
    depth, box, truth = render_box_scene()
    sloppy = box.copy()
    ys, xs = np.nonzero(box)
    sloppy[ys.min() - 3: ys.min(), xs.min(): xs.max() + 1] = True  # a band of wall pixels above the box
    holes = np.random.default_rng(0).random(depth.shape) < 0.2
    mm = np.round(depth * 1000).astype(np.uint16)
    mm[holes] = 0  # 20 % of the pixels without a reading, as real sensors
    target = mask_target(depth_to_meters(mm), sloppy, K)
    assert target is not None
    assert np.linalg.norm(np.array(target.point) - truth) < 0.02


def test_target_point_none_without_valid_depth():
    depth, box, _ = render_box_scene()
    assert mask_target(np.full_like(depth, np.nan), box, K) is None
    assert mask_target(depth, np.zeros_like(box), K) is None


def test_scaled_intrinsics_give_the_same_point_on_a_half_size_image():
    depth, box, truth = render_box_scene()
    h, w = depth.shape
    half_depth = depth.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))  # 2x2 block average
    half_box = box.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) == 1.0
    wrong = mask_target(half_depth, half_box, K)
    right = mask_target(half_depth, half_box, K.scaled(0.5, 0.5))
    assert right is not None and wrong is not None
    assert np.linalg.norm(np.array(right.point) - truth) < 0.02
    assert np.linalg.norm(np.array(wrong.point) - truth) > 0.05  # the full-size K would be far off


# ---------------------------------------------------------------------- grasp poses (geometry.mask_grasp)
def _bar_scene(angle_deg: float, size=(240, 320), z=0.6, half=(60, 8)):
    """Depth (plane at ``z`` with a 1 cm bar on it) and the bar's mask: long axis at ``angle_deg`` in the image."""
    h, w = size
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    a = math.radians(angle_deg)
    du, dv = u - w / 2, v - h / 2
    along, across = du * math.cos(a) + dv * math.sin(a), -du * math.sin(a) + dv * math.cos(a)
    mask = (np.abs(along) <= half[0]) & (np.abs(across) <= half[1])
    depth = np.full(size, z, np.float32)
    depth[mask] = z - 0.01
    return depth, mask


@pytest.mark.parametrize("angle", [0.0, 30.0, 75.0, 90.0, 135.0, 170.0])
def test_mask_grasp_long_axis_frame_and_width(angle):
    from lisa_agent.geometry import mask_grasp
    k = Intrinsics(fx=300.0, fy=300.0, cx=159.5, cy=119.5)
    depth, mask = _bar_scene(angle)
    grasp = mask_grasp(depth, mask, k)
    assert grasp is not None
    diff = abs(grasp.angle_deg - angle) % 180
    assert min(diff, 180 - diff) < 1.0
    rot = grasp.rotation()
    assert np.allclose(rot.T @ rot, np.eye(3), atol=1e-6) and np.linalg.det(rot) == pytest.approx(1.0)
    ray = np.array(grasp.position) / np.linalg.norm(grasp.position)
    assert rot[:, 2] @ ray == pytest.approx(1.0, abs=1e-6)  # approach along the camera ray
    assert abs(rot[:, 0] @ np.array(grasp.axis)) > 0.99  # x: the long axis
    # the bar is 17 px wide and 121 px long at 0.59 m: 300 px per 0.59 m
    assert grasp.width_m == pytest.approx(17 * 0.59 / 300, rel=0.2)
    assert grasp.length_m == pytest.approx(121 * 0.59 / 300, rel=0.1)
    assert grasp.elongation > 4


def test_target_carries_grasp_and_round_trips():
    from lisa_agent.geometry import Target
    k = Intrinsics(fx=300.0, fy=300.0, cx=159.5, cy=119.5)
    depth, mask = _bar_scene(45.0)
    target = mask_target(depth, mask, k)
    assert target is not None and target.grasp is not None
    assert target.grasp.position == target.point
    d = target.to_dict()
    back = Target.from_dict(d)
    assert back.grasp is not None and back.grasp.angle_deg == pytest.approx(target.grasp.angle_deg, abs=0.01)
    assert Target.from_dict({k_: v for k_, v in d.items() if k_ != "grasp"}).grasp is None  # older results
    assert mask_target(depth, mask, None).grasp is None  # no intrinsics: no grasp
    few = np.zeros_like(mask)
    few[100, 100:105] = True
    assert mask_target(depth, few, k).grasp is None  # too few points


def test_quaternion_round_trip():
    from lisa_agent.geometry import matrix_to_quaternion, quaternion_to_matrix
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        r = quaternion_to_matrix(q)
        q2 = np.array(matrix_to_quaternion(r))
        assert np.allclose(quaternion_to_matrix(q2), r, atol=1e-9)


def test_grasp_axes_agree_with_tabletop_poses():
    """Held-out tabletop scenes with rendered depth (tilted table): the long axis within 10 degrees of the
    known pose for most elongated objects (the full measurement: docs/evaluation.md, 'Grasp axis')."""
    from lisa_agent.data.tabletop_depth import evaluate_grasp_axes
    report = evaluate_grasp_axes(scenes=30)
    overall = report["overall"]
    assert overall["n"] > 60 and overall["within_10deg"] >= 0.9 and overall["median_deg"] < 3
    assert report["per_class"]["knife"]["median_deg"] < 3


@pytest.mark.slow
def test_grasp_axes_through_the_bundled_model():
    """The whole path on a few held-out scenes: the bundled model's masks for explicit queries, then grasps."""
    from lisa_agent.data.tabletop_depth import evaluate_grasp_axes
    report = evaluate_grasp_axes(scenes=4, masks="model", model="tabletop-tiny")
    assert report["masks"] == "model tabletop-tiny" and report["median_iou"] is not None
    assert report["overall"]["n"] + report["no_mask"] + report["no_grasp"] >= 8
    hit = report["overall_mask_hit"]  # where the model found the object (IoU >= 0.5), the axis follows it
    assert hit["n"] >= 3 and hit["median_deg"] < 10
