"""SplicePlan: every index map against the per-row construction of tests/strategies.py, plus its errors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from strategies import PlanSpec, plan_specs, random_spec, spliced_rows

from cmcaug.errors import InputError
from cmcaug.kernels import index_maps
from cmcaug.plan import PAD_SOURCE, SplicePlan


def expected_maps(spec: PlanSpec) -> dict[str, np.ndarray]:
    """The plan's maps, written out from `spliced_rows`, one output token at a time."""
    rows = spliced_rows(spec)
    batch, width, k = len(rows), spec.width, spec.patch_tokens
    out_width = max(len(row) for row in rows)
    slots = sum(kind == "patch" for row in rows for kind, _, _ in row) // k
    maps = {
        "source_index": np.full((batch, out_width), PAD_SOURCE, np.int64),
        "text_destination": np.full((batch, width), -1, np.int64),
        "patch_destination": np.full((slots, k), -1, np.int64),
        "modality_ids": np.zeros((batch, out_width), np.int64),
        "position_ids": np.zeros((batch, out_width), np.int64),
        "slot_rows": np.zeros(slots, np.int64),
    }
    for b, row in enumerate(rows):
        for t, (kind, i, j) in enumerate(row):
            maps["position_ids"][b, t] = t
            if kind == "text":
                maps["source_index"][b, t] = b * width + i
                maps["text_destination"][b, i] = b * out_width + t
            else:
                maps["source_index"][b, t] = -(i * k + j) - 1
                maps["patch_destination"][i, j] = b * out_width + t
                maps["modality_ids"][b, t] = 1
                maps["slot_rows"][i] = b
    maps["attention_mask"] = (maps["source_index"] != PAD_SOURCE).astype(np.int64)
    maps["output_lengths"] = np.array([len(row) for row in rows])
    maps["slots_per_row"] = np.bincount(maps["slot_rows"], minlength=batch)
    maps["slot_span_index"] = np.concatenate([np.arange(n) for n in maps["slots_per_row"]]).astype(np.int64)
    return maps


def assert_plan_matches(spec: PlanSpec, plan: SplicePlan) -> None:
    for name, expected in expected_maps(spec).items():
        actual = getattr(plan, name)
        actual = actual.cpu().numpy() if isinstance(actual, torch.Tensor) else actual
        assert actual.shape == expected.shape, name
        np.testing.assert_array_equal(actual, expected, err_msg=name)
    for name in ("source_index", "text_destination", "patch_destination"):
        assert getattr(plan, name).dtype == torch.int32, name
    # Labels follow their text token; patch tokens and padding are ignored.
    labels = torch.arange(plan.batch_size * plan.text_length).reshape(plan.batch_size, plan.text_length) + 1000
    want = torch.full(plan.source_index.shape, -7, dtype=labels.dtype)
    for b, row in enumerate(spliced_rows(spec)):
        for t, (kind, j, _) in enumerate(row):
            if kind == "text":
                want[b, t] = labels[b, j]
    assert torch.equal(plan.remap_labels(labels, ignore_index=-7), want)


@settings(max_examples=600, deadline=None)
@given(plan_specs())
def test_maps_match_per_row_construction(spec: PlanSpec) -> None:
    assert_plan_matches(spec, spec.build())


@pytest.mark.parametrize("seed", range(40))
def test_large_random_plans_match_per_row_construction(seed: int) -> None:
    spec = random_spec(np.random.default_rng(seed), batch=64)  # 40 x 64 ragged rows in all
    assert_plan_matches(spec, spec.build())


def test_worked_example() -> None:
    # Row 0: "a [b c] [d] e" with K=2; row 1: entirely one span; row 2: empty.
    plan = SplicePlan.build([5, 3, 0], [[(1, 3), (3, 4)], [(0, 3)], []], patch_tokens=2)
    pad = PAD_SOURCE
    assert plan.source_index.tolist() == [[0, -1, -2, -3, -4, 4], [-5, -6, pad, pad, pad, pad], [pad] * 6]
    assert plan.text_destination.tolist() == [[0, -1, -1, -1, 5], [-1] * 5, [-1] * 5]
    assert plan.patch_destination.tolist() == [[1, 2], [3, 4], [6, 7]]
    assert plan.modality_ids.tolist()[0] == [0, 1, 1, 1, 1, 0]
    assert plan.position_ids.tolist()[1] == [0, 1, 0, 0, 0, 0]
    assert (plan.batch_size, plan.text_length, plan.output_length, plan.num_slots, plan.patch_tokens) == (3, 5, 6, 3, 2)


def test_a_plan_is_what_the_kernels_read() -> None:
    """`SplicePlan` satisfies the kernels' `SpliceMaps` (whose sentinel it uses), with sizes in the maps' shapes."""
    plan = SplicePlan.build([5, 3, 0], [[(1, 3), (3, 4)], [(0, 3)], []], patch_tokens=2, text_length=6)
    assert PAD_SOURCE is index_maps.PAD_SOURCE
    for name in index_maps.SpliceMaps.__annotations__:
        assert isinstance(getattr(plan, name), torch.Tensor), name
    assert plan.source_index.shape == (plan.batch_size, plan.output_length)
    assert plan.text_destination.shape == (plan.batch_size, plan.text_length)
    assert plan.patch_destination.shape == (plan.num_slots, plan.patch_tokens)


def test_max_length_keeps_spans_that_do_not_fit_as_text() -> None:
    # The second patch would need positions 3..4 of 4: it stays text, and is truncated with the row.
    plan = SplicePlan.build([6], [[(1, 2), (3, 5)]], patch_tokens=2, max_length=4)
    assert plan.source_index.tolist() == [[0, -1, -2, 2]]
    assert plan.slots_per_row.tolist() == [1] and plan.num_slots == 1
    assert plan.text_destination.tolist() == [[0, -1, 3, -1, -1, -1]]


def test_text_length_pads_the_text_width() -> None:
    plan = SplicePlan.build([2, 1], [[(0, 1)], []], text_length=4)
    assert plan.text_length == 4
    assert plan.source_index.tolist() == [[-1, 1], [4, PAD_SOURCE]]


def test_accepts_numpy_inputs() -> None:
    spans = [np.array([[0, 2]]), np.zeros((0, 2), np.int32)]
    plan = SplicePlan.build(np.array([3, 2], np.int32), spans, patch_tokens=np.int64(3))
    assert plan.source_index.tolist() == [[-1, -2, -3, 2], [3, 4, PAD_SOURCE, PAD_SOURCE]]


def test_to_and_repr() -> None:
    plan = SplicePlan.build([3], [[(0, 1)]])
    moved = plan.to("cpu", non_blocking=True)
    assert moved.device == torch.device("cpu") and torch.equal(moved.source_index, plan.source_index)
    assert plan.attention_mask is plan.attention_mask  # derived maps: computed once per plan
    elsewhere = plan.to("meta")
    for name in ("source_index", "text_destination", "patch_destination", "attention_mask", "modality_ids",
                 "position_ids"):
        assert getattr(elsewhere, name).device.type == "meta", name
    assert plan.device == torch.device("cpu") and plan.attention_mask.device.type == "cpu"  # the original stays
    assert repr(plan) == (
        "SplicePlan(batch_size=1, text_length=3, output_length=3, num_slots=1, patch_tokens=1, device=cpu)"
    )


def _one_span_per_row(lengths: list[int]) -> PlanSpec:
    return PlanSpec(tuple(lengths), tuple(((0, 1),) if n else () for n in lengths), patch_tokens=2)


def _collate(lengths: list[int]) -> SplicePlan:
    return _one_span_per_row(lengths).build()


def test_plans_cross_dataloader_workers() -> None:
    """A collate function builds the plan in a worker process; the training process gets it intact."""
    loader = torch.utils.data.DataLoader([3, 0, 5, 1], batch_size=2, num_workers=1, collate_fn=_collate)
    for lengths, plan in zip(([3, 0], [5, 1]), loader):
        assert_plan_matches(_one_span_per_row(lengths), plan)


@pytest.mark.gpu
def test_pin_memory_and_to_cuda() -> None:
    plan = SplicePlan.build([4, 2], [[(1, 3)], [(0, 2)]], patch_tokens=3).pin_memory()
    assert plan.source_index.is_pinned() and plan.position_ids.is_pinned()
    moved = plan.to("cuda", non_blocking=True)
    assert moved.device.type == "cuda"
    assert torch.equal(moved.attention_mask.cpu(), plan.attention_mask)
    labels = torch.arange(8, device="cuda").reshape(2, 4)
    assert torch.equal(moved.remap_labels(labels).cpu(), plan.remap_labels(labels.cpu()))


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (([], []), {}, "non-empty"),
        (([3, -1], [[], []]), {}, ">= 0"),
        (([3.0], [[]]), {}, "integers"),
        (([3], []), {}, "one list of"),
        (([3], "ab"), {}, "one list of"),
        (([3], [[(0, 1, 2)]]), {}, "(start, end) pairs"),
        (([3], [[(1.5, 2)]]), {}, "integers"),
        (([3], [[(2, 2)]]), {}, "non-empty token range"),
        (([3], [[(2, 4)]]), {}, "inside the row's 3 tokens"),
        (([3], [[(-1, 1)]]), {}, "non-empty token range"),
        (([5], [[(2, 4), (3, 5)]]), {}, "sorted and non-overlapping"),
        (([5], [[(3, 4), (0, 1)]]), {}, "sorted and non-overlapping"),
        (([3], [[]]), {"patch_tokens": 0}, "patch_tokens"),
        (([3], [[]]), {"patch_tokens": True}, "patch_tokens"),
        (([3], [[]]), {"max_length": 0}, "max_length"),
        (([3], [[]]), {"text_length": 2}, "shorter than the longest row"),
        (([1], [[]]), {"text_length": 2**31}, "int32"),
    ],
)
def test_build_errors(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SplicePlan.build(*args, **kwargs)


def test_hand_made_plans_with_inconsistent_maps_are_refused() -> None:
    plan = SplicePlan.build([3, 2], [[(0, 1)], []])
    with pytest.raises(InputError, match="2-D int32 tensor"):
        dataclasses.replace(plan, source_index=plan.source_index.long())
    with pytest.raises(InputError, match="disagree on the batch size"):
        dataclasses.replace(plan, text_destination=plan.text_destination[:1])
    with pytest.raises(InputError, match="one device"):
        dataclasses.replace(plan, patch_destination=plan.patch_destination.to("meta"))


def test_remap_labels_errors() -> None:
    plan = SplicePlan.build([3, 2], [[(0, 1)], []])
    with pytest.raises(InputError, match=r"shape \[B, L\] = \[2, 3\]"):
        plan.remap_labels(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="torch.Tensor"):
        plan.remap_labels(np.zeros((2, 3)))
    with pytest.raises(InputError, match="plan is on cpu"):
        plan.remap_labels(torch.zeros(2, 3, dtype=torch.long, device="meta"))
